"""The teacher cache format and reader: round trips per codec and dtype, refusals, corruption, stats."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cache_samples import (
    FINGERPRINT,
    counts,
    make_samples,
    small_layout,
    write_store,
)

from pipeline.cache.store import CacheReader, store_stats
from pipeline.cache.writer import CacheWriter
from pipeline.errors import MimicError


@pytest.mark.parametrize("codec", ["lossless", "int8"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_round_trip_out_of_order(tmp_path, dtype, codec):
    layout = small_layout(dtype=dtype, codec=codec, topk_dtype=dtype)
    samples = make_samples(layout, 12)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(1)).tolist()
    write_store(tmp_path / "c", layout, samples, order)
    reader = CacheReader.open(tmp_path / "c", expect=FINGERPRINT)
    assert len(reader) == 12 and reader.layout == layout and reader.fingerprint == FINGERPRINT
    asked = [5, 0, 11, 5, 3, 4]
    for i, (states, values, indices) in zip(asked, reader.read_many(asked), strict=True):
        ref_states, ref_values, ref_indices = samples[i]
        assert states.dtype == ref_states.dtype and states.shape == ref_states.shape
        if codec == "lossless":
            assert torch.equal(states.view(-1).view(torch.uint8), ref_states.view(-1).view(torch.uint8))
        else:
            err = (states.double() - ref_states.double()).norm() / ref_states.double().norm()
            assert err <= 0.01, f"sample {i}: relative L2 error {err:.4f}"
        assert (
            torch.equal(values, ref_values)
            and torch.equal(indices, ref_indices)
            and indices.dtype == torch.int64
        )
    assert torch.equal(reader.read(7)[0], reader.read_many([7])[0][0])


def test_int8_needs_its_outliers(tmp_path):
    """Plain per-token absmax int8 breaks the 1% bound on massive channels; the exact outliers restore it."""
    samples = make_samples(small_layout(hidden_size=512), 3)
    errors = {}
    for outliers in (0, 8):
        layout = small_layout(hidden_size=512, codec="int8", int8_outliers=outliers)
        write_store(tmp_path / str(outliers), layout, samples)
        states = CacheReader.open(tmp_path / str(outliers)).read(0)[0]
        errors[outliers] = ((states - samples[0][0]).norm() / samples[0][0].norm()).item()
    assert errors[0] > 0.01 > errors[8]


def test_fingerprint_mismatch_names_the_key(tmp_path):
    layout = small_layout()
    samples = make_samples(layout, 2)
    write_store(tmp_path / "c", layout, samples)
    other = {**FINGERPRINT, "model_config_hash": "zzz"}
    with pytest.raises(
        MimicError,
        match=r"fingerprint 'model_config_hash' is 'abc123' there but 'zzz' now; pick another cache path or delete",
    ):
        CacheWriter.open(tmp_path / "c", other, layout, *counts(samples))
    with pytest.raises(MimicError, match=r"'model_config_hash' differs \(cache 'abc123', expected 'zzz'\)"):
        CacheReader.open(tmp_path / "c", expect=other)
    with pytest.raises(MimicError, match="layout codec='lossless', this run wants 'int8'"):
        CacheWriter.open(tmp_path / "c", FINGERPRINT, small_layout(codec="int8"), *counts(samples))
    with pytest.raises(MimicError, match="other tokens counts"):
        CacheWriter.open(tmp_path / "c", FINGERPRINT, layout, [1, 1], counts(samples)[1])


def test_read_many_groups_neighbours(tmp_path, monkeypatch):
    layout = small_layout(chunk_tokens=256)
    samples = make_samples(layout, 6)
    write_store(tmp_path / "c", layout, samples)
    reader = CacheReader.open(tmp_path / "c")
    calls = []
    read_group = reader._read_group
    monkeypatch.setattr(reader, "_read_group", lambda ids: calls.append(ids) or read_group(ids))
    out = reader.read_many([4, 0, 2])
    assert calls == [[0, 2, 4]] and torch.equal(out[0][0], samples[4][0])


def test_corrupt_data_is_reported(tmp_path):
    layout = small_layout()
    samples = make_samples(layout, 4)
    path = tmp_path / "c"
    write_store(path, layout, samples)
    shard = sorted((path / "states").rglob("c/*/0/0"))[0]
    good = shard.read_bytes()
    damaged = [
        bytes(np.random.default_rng(0).integers(0, 256, len(good), dtype=np.uint8)),
        good[:100] + bytes([good[100] ^ 1]) + good[101:],
    ]
    for bad in damaged:
        shard.write_bytes(bad)
        with pytest.raises(MimicError, match=f"{path}: sample 0: array states is corrupt"):
            CacheReader.open(path).read(0)
    shard.unlink()  # a missing file reads as zeros: only the checksum notices
    with pytest.raises(MimicError, match=f"{path}: sample 0 fails its checksum"):
        CacheReader.open(path).read(0)


def test_not_a_store_and_missing_path(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not a cache")
    layout = small_layout()
    with pytest.raises(MimicError, match="is not a MimIC teacher cache"):
        CacheWriter.open(tmp_path / "junk", FINGERPRINT, layout, [3], [1])
    (tmp_path / "empty").mkdir()  # an empty directory is taken as no store
    CacheWriter.open(tmp_path / "empty", FINGERPRINT, layout, [3], [1]).close()
    assert (tmp_path / "empty" / "zarr.json").is_file()
    with pytest.raises(MimicError, match="does not exist; run mimic extract first"):
        CacheReader.open(tmp_path / "nothing")


def test_store_stats(tmp_path):
    layout = small_layout(dtype="bfloat16", topk=0)
    samples = make_samples(layout, 4)
    write_store(tmp_path / "c", layout, samples)
    stats = store_stats(tmp_path / "c")
    values = sum(s.numel() for s, _, _ in samples)
    assert stats["state_values"] == values and stats["raw_bytes"] == 2 * values
    assert stats["bytes_on_disk"] == sum(p.stat().st_size for p in (tmp_path / "c").rglob("*") if p.is_file())
    assert (
        0 < stats["bytes_per_value"] < 2.2
        and stats["compression_ratio"] == stats["raw_bytes"] / stats["bytes_on_disk"]
    )
