"""Shared helpers of the cache tests: synthetic teacher samples, small layouts, store comparison."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import zarr

from pipeline.cache.store import CacheReader, Layout
from pipeline.cache.writer import CacheWriter

FINGERPRINT = {"model_config_hash": "abc123", "tokenizer_hash": "t1", "dataset": "vqav2", "k": 4, "seed": 0}

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def heavy_tailed(
    layers: int, tokens: int, hidden: int, dtype: torch.dtype, g: torch.Generator
) -> torch.Tensor:
    """Activations like a transformer's: N(0, 1) with a few massive channels. -> [L, T, H]"""
    x = torch.randn(layers, tokens, hidden, generator=g)
    x[..., :3] *= torch.tensor([30.0, 100.0, 300.0])
    return x.to(dtype)


def make_samples(
    layout: Layout, n: int, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        tokens, answers = (
            int(torch.randint(1, 50, (), generator=g)),
            int(torch.randint(0, 4, (), generator=g)),
        )
        states = heavy_tailed(layout.num_layers, tokens, layout.hidden_size, DTYPES[layout.dtype], g)
        values = (
            torch.randn(answers, layout.topk, generator=g).to(DTYPES[layout.topk_dtype])
            if layout.topk
            else None
        )
        indices = torch.randint(0, 32000, (answers, layout.topk), generator=g) if layout.topk else None
        samples.append((states, values, indices))
    return samples


def counts(samples) -> tuple[list[int], list[int]]:
    return [s.shape[1] for s, _, _ in samples], [0 if v is None else v.shape[0] for _, v, _ in samples]


def write_store(path: Path, layout: Layout, samples, order=None) -> None:
    writer = CacheWriter.open(path, FINGERPRINT, layout, *counts(samples))
    for i in order if order is not None else range(len(samples)):
        writer.write(i, *samples[i])
    writer.finish()


def small_layout(**kw) -> Layout:
    return Layout(
        **{"num_layers": 3, "hidden_size": 64, "topk": 5, "chunk_tokens": 16, "shard_chunks": 4, **kw}
    )


def snapshot(path: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(path)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def assert_same_store(a: Path, b: Path) -> None:
    """Every attribute and array of store a equals store b's, and every decoded sample too."""
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    assert ga.attrs.asdict() == gb.attrs.asdict()
    names = sorted(name for name, _ in ga.arrays())
    assert names == sorted(name for name, _ in gb.arrays())
    for name in names:
        np.testing.assert_array_equal(ga[name][...], gb[name][...], err_msg=name)
    ra, rb = CacheReader.open(a), CacheReader.open(b)
    assert ra.fingerprint == rb.fingerprint and len(ra) == len(rb)
    for i, (x, y) in enumerate(zip(ra.read_many(range(len(ra))), rb.read_many(range(len(rb))), strict=True)):
        assert all(torch.equal(u, v) for u, v in zip(x, y, strict=True)), f"sample {i}"
    assert not list(Path(a).rglob("*.partial"))
