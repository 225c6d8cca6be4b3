"""ShardWriter writes the very bytes zarr writes for a whole shard, and declines arrays it cannot reproduce."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from pipeline.cache.shards import ShardWriter
from pipeline.cache.store import _compressors


def make_pair(root, shape, chunks, shards, dtype, compressors=None, empty_chunks=True, **kwargs):
    """Two identical arrays: one written by zarr, one by ShardWriter (as the cache opens them: every chunk
    written, all-zero ones too)."""
    group = zarr.open_group(root, mode="w", zarr_format=3)
    make = lambda name: group.create_array(  # noqa: E731
        name,
        shape=shape,
        chunks=chunks,
        shards=shards,
        dtype=dtype,
        compressors=_compressors() if compressors is None else compressors,
        fill_value=0,
        **kwargs,
    )
    config = {"write_empty_chunks": empty_chunks}
    return make("by_zarr").with_config(config), make("by_us").with_config(config)


@pytest.mark.parametrize(
    "shape, chunks, shards, dtype, axis",
    [
        ((3, 100, 24), (3, 8, 24), (3, 32, 24), "float32", 1),  # lossless float32 states [L, T, H]
        ((3, 96, 24), (3, 8, 24), (3, 32, 24), "float16", 1),  # float16; a whole number of shards
        ((2, 50, 8), (2, 4, 8), (2, 16, 8), "float64", 1),
        ((2, 70, 16), (2, 5, 16), (2, 20, 16), "uint16", 1),  # bfloat16 bit patterns
        ((3, 100, 24), (3, 8, 24), (3, 16, 24), "int8", 1),  # int8 states_q
        ((3, 100), (3, 8), (3, 32), "float32", 1),  # int8 scales [L, T]
        ((3, 100, 4), (3, 8, 4), (3, 32, 4), "int16", 1),  # int8 outlier channels [L, T, r]
        ((100, 5), (10, 5), (40, 5), "int64", 0),  # ragged axis first
    ],
)
def test_whole_shards_match_zarr_bytes(tmp_path, shape, chunks, shards, dtype, axis):
    rng = np.random.default_rng(0)
    data = (rng.standard_normal(shape) * 50).astype(dtype)
    by_zarr, by_us = make_pair(tmp_path / "g", shape, chunks, shards, dtype)
    writer = ShardWriter.for_array(tmp_path / "g" / "by_us", by_us, axis)
    assert writer is not None and writer.shard_rows == shards[axis]
    count = -(-shape[axis] // shards[axis])  # the last shard may stick out of the array
    assert writer.rows(count - 1) == shape[axis] - (count - 1) * shards[axis] and writer.rows(count) == 0
    rows = lambda a, b: tuple([slice(None)] * axis + [slice(a, b)])  # noqa: E731
    data[rows(0, 1)] = 0  # an all-zero chunk is written like any other
    by_zarr[...] = data

    def block(shard):
        return data[rows(shard * writer.shard_rows, shard * writer.shard_rows + writer.rows(shard))]

    with ThreadPoolExecutor(2) as pool:  # all but the last in one call, chunks compressed on two threads
        writer.write_many([(shard, block(shard)) for shard in range(count - 1)], pool)
    writer.write_many([(count - 1, block(count - 1))])
    files = lambda name: sorted(p for p in (tmp_path / "g" / name / "c").rglob("*") if p.is_file())  # noqa: E731
    ours, theirs = files("by_us"), files("by_zarr")
    assert [p.relative_to(tmp_path / "g" / "by_us") for p in ours] == [
        p.relative_to(tmp_path / "g" / "by_zarr") for p in theirs
    ]
    assert len(ours) == count
    for a, b in zip(ours, theirs, strict=True):
        assert a.read_bytes() == b.read_bytes(), a
    back = zarr.open_group(tmp_path / "g", mode="r")["by_us"]
    np.testing.assert_array_equal(back[...], data)
    assert not list((tmp_path / "g").rglob("*.partial"))


def test_declines_what_it_cannot_reproduce(tmp_path):
    cases = {
        "unsharded": dict(shards=None),
        "zstd": dict(compressors=[ZstdCodec()]),
        "blosc without crc": dict(compressors=[BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")]),
        "chunked on two axes": dict(chunks=(1, 8, 24), shards=(3, 32, 24)),
        "index first": dict(shards={"shape": (3, 32, 24), "index_location": "start"}),
        "two shards across layers": dict(shape=(6, 100, 24), shards=(3, 32, 24)),
        "layers not filling their chunk": dict(shape=(2, 100, 24)),
        "empty chunks left out": dict(empty_chunks=False),
        "dotted chunk keys": dict(chunk_key_encoding={"name": "default", "separator": "."}),
    }
    for i, (name, change) in enumerate(cases.items()):
        spec = dict(shape=(3, 100, 24), chunks=(3, 8, 24), shards=(3, 32, 24), dtype="float32") | change
        _, array = make_pair(tmp_path / str(i), **spec)
        assert ShardWriter.for_array(tmp_path / str(i) / "by_us", array, 1) is None, name


def test_refuses_partial_or_outside_shards(tmp_path):
    _, array = make_pair(tmp_path / "g", (3, 100, 24), (3, 8, 24), (3, 32, 24), "float32")
    writer = ShardWriter.for_array(tmp_path / "g" / "by_us", array, 1)
    with pytest.raises(ValueError, match="needs all its 32 rows"):
        writer.write_many([(0, np.zeros((3, 16, 24), "float32"))])
    with pytest.raises(ValueError, match="needs all its 4 rows"):
        writer.write_many([(3, np.zeros((3, 32, 24), "float32"))])  # rows 96..100 are the last shard's
    with pytest.raises(ValueError, match="needs all its 0 rows"):
        writer.write_many([(4, np.zeros((3, 32, 24), "float32"))])
    ok = np.ones((3, 32, 24), "float32")
    with pytest.raises(ValueError, match="needs all its 32 rows"):
        writer.write_many([(0, ok), (1, ok[:, :31])])  # checked before anything is written
    with pytest.raises(ValueError, match=r"a \(3, 32, 24\) float32 block, got \(3, 32, 24\) float64"):
        writer.write_many([(0, ok.astype("float64"))])  # raw bytes are written: no silent reinterpretation
    with pytest.raises(ValueError, match="float32 block, got"):
        writer.write_many([(0, ok.astype(">f4"))])  # big-endian
    with pytest.raises(ValueError, match=r"got \(3, 32, 23\)"):
        writer.write_many([(0, ok[..., :23])])
    assert not list((tmp_path / "g" / "by_us").rglob("c/*"))
