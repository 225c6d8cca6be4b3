"""Teacher-cache codecs on synthetic hidden states shaped like a transformer's: size on disk and throughput.

    .venv/bin/python benchmarks/cache_codecs.py              # codecs: 8 layers x 2048 hidden, 24 samples, ~30 s
    .venv/bin/python benchmarks/cache_codecs.py --chunking   # chunk and shard sizes, bfloat16 lossless, ~1 min

States are N(0, 1) times a log-normal per-channel scale, plus 4 massive channels per layer (x20 to x500), as in
real residual-stream / MLP-output activations. Write throughput covers validation, encoding, compression and
the files (batches of 8 staged writes, as `mimic extract` writes); read throughput covers a full pass in shuffled batches of 8 with checksum verification. MB/s count
the states' raw bytes in the teacher dtype (1 MB = 1e6 bytes). "rel. L2" is the worst per-sample relative L2 error.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from pipeline.cache.codecs import TORCH_DTYPES
from pipeline.cache.store import CacheReader, Layout, store_stats
from pipeline.cache.writer import CacheWriter

# (codec, int8_outliers, label): the last row shows why int8 keeps its outliers exactly.
VARIANTS = [("lossless", 8, "lossless"), ("int8", 8, "int8"), ("int8", 0, "int8, no outliers")]


def synthetic_states(layers: int, tokens: int, hidden: int, g: torch.Generator) -> torch.Tensor:
    """Heavy-tailed activations, float32 [L, T, H]."""
    channel_scale = torch.exp(0.5 * torch.randn(layers, 1, hidden, generator=g))
    x = torch.randn(layers, tokens, hidden, generator=g) * channel_scale
    massive = torch.randint(0, hidden, (layers, 1, 4), generator=g)
    boost = torch.ones(layers, 1, hidden).scatter_(
        -1, massive, torch.tensor([20.0, 50.0, 150.0, 500.0]).expand(layers, 1, 4)
    )
    return x * boost  # (L, T, H)


def measure(root: Path, layout: Layout, samples: list[torch.Tensor]) -> dict:
    path = root / f"{layout.dtype}-{layout.codec}-{layout.int8_outliers}"
    raw = sum(s.numel() for s in samples) * samples[0].element_size()
    start = time.perf_counter()
    writer = CacheWriter.open(
        path, {"benchmark": 1}, layout, [s.shape[1] for s in samples], [0] * len(samples)
    )
    for first in range(0, len(samples), 8):  # as mimic extract writes: batches, staged shard by shard
        writer.write_many(
            [(i, samples[i], None, None) for i in range(first, min(first + 8, len(samples)))], False
        )
    writer.finish()
    write_s = time.perf_counter() - start

    reader = CacheReader.open(path)
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0)).tolist()
    start = time.perf_counter()
    decoded = {}
    for b in range(0, len(order), 8):
        batch = order[b : b + 8]
        decoded.update(zip(batch, (s for s, _, _ in reader.read_many(batch)), strict=True))
    read_s = time.perf_counter() - start
    error = max(
        ((decoded[i].double() - s.double()).norm() / s.double().norm()).item() for i, s in enumerate(samples)
    )
    stats = store_stats(path)
    shutil.rmtree(path)
    return {
        "bytes/value": stats["bytes_per_value"],
        "ratio": stats["raw_bytes"] / stats["bytes_on_disk"],
        "write MB/s": raw / write_s / 1e6,
        "read MB/s": raw / read_s / 1e6,
        "rel. L2": error,
    }


def print_row(cells: list[str]) -> None:
    print("| " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument(
        "--chunking", action="store_true", help="sweep chunk and shard sizes (bfloat16, lossless)"
    )
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(64, 193, (args.samples,), generator=g).tolist()
    base = [synthetic_states(args.layers, t, args.hidden, g) for t in lengths]
    tokens = sum(lengths)
    print(
        f"{args.samples} samples, {tokens} tokens, {args.layers} layers x {args.hidden} hidden = "
        f"{tokens * args.layers * args.hidden / 1e6:.1f}M values per dtype"
    )
    if args.chunking:
        layouts = [
            (
                ["bfloat16", f"{c} ({c * args.layers * args.hidden * 2 / 2**20:.2f} MiB)", str(s)],
                Layout(args.layers, args.hidden, "bfloat16", chunk_tokens=c, shard_chunks=s),
            )
            for c in (8, 16, 32, 64, 128)
            for s in (1, 4, 16)
        ]
        header = ["dtype", "chunk tokens", "chunks/shard"]
    else:
        layouts = [
            ([dtype, label], Layout(args.layers, args.hidden, dtype, codec, int8_outliers=outliers))
            for dtype in ("float32", "bfloat16")
            for codec, outliers, label in VARIANTS
        ]
        header = ["dtype", "codec"]
    print_row(header + ["bytes/value", "ratio", "write MB/s", "read MB/s", "rel. L2"])
    print("|" + "|".join("---" for _ in range(len(header) + 5)) + "|")
    with tempfile.TemporaryDirectory() as root:
        for cells, layout in layouts:
            samples = [s.to(TORCH_DTYPES[layout.dtype]) for s in base]
            row = measure(Path(root), layout, samples)
            print_row(
                cells
                + [
                    f"{row['bytes/value']:.3f}",
                    f"{row['ratio']:.2f}",
                    f"{row['write MB/s']:.0f}",
                    f"{row['read MB/s']:.0f}",
                    f"{row['rel. L2']:.2e}",
                ]
            )


if __name__ == "__main__":
    main()
