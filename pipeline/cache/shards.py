"""Whole-shard writes that skip zarr's asyncio chunk pipeline: encode a shard's inner chunks with the array's own
Blosc settings (on a thread pool; Blosc releases the GIL), append their crc32c, the shard index, and write the
file in one atomic rename, exactly as zarr would (tests/test_cache_shards.py checks the bytes against zarr's).

Why: zarr 3.1 routes every chunk through an event loop thread and ``asyncio.to_thread``; for the teacher cache's
few large chunks that costs about as much as the compression itself (docs/benchmarks.md). Only what the cache
needs is supported: a sharded array whose inner codecs are bytes (little endian) -> Blosc -> crc32c, index
codecs bytes -> crc32c at the end of the file, and one ragged axis split into chunks inside a shard. For any
other array ``ShardWriter.for_array`` returns None and the caller writes through zarr.

Format (Zarr v3 sharding codec): the encoded inner chunks back to back in Morton order (here: along the ragged
axis, the only one with more than one chunk per shard), then the index, ``uint64 [chunks_per_shard..., 2]``
(offset, length) little endian, followed by its own crc32c.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterable
from concurrent.futures import Executor
from pathlib import Path

import google_crc32c
import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.codecs.bytes import Endian
from zarr.codecs.sharding import ShardingCodecIndexLocation

__all__ = ["ShardWriter"]

_SHUFFLE = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}


def _with_crc(data: bytes | np.ndarray) -> tuple[bytes | np.ndarray, bytes]:
    """The data and its crc32c as 4 little-endian bytes (zarr's crc32c codec)."""
    return data, int(google_crc32c.value(data)).to_bytes(4, "little")


class ShardWriter:
    """Writes whole shards of one zarr array: ``write_many([(shard, block)])``, block [*lead, rows(shard), *tail]."""

    def __init__(self, directory: Path, array: zarr.Array, axis: int, blosc: BloscCodec) -> None:
        self.directory, self.axis, self._array = directory, axis, array
        self.chunk_rows = array.metadata.codecs[0].chunk_shape[axis]
        self.shard_rows = array.shards[axis]
        self._blosc = numcodecs.Blosc(
            cname=blosc.cname.value,
            clevel=blosc.clevel,
            shuffle=_SHUFFLE[blosc.shuffle.value],
            blocksize=blosc.blocksize,
            typesize=blosc.typesize,
        )

    @classmethod
    def for_array(cls, directory: Path, array: zarr.Array, axis: int) -> ShardWriter | None:
        """A writer for ``array`` (stored under ``directory``) sharded along ``axis``, or None where its codecs or
        chunking are not the ones this module reproduces."""
        meta = array.metadata
        codecs = getattr(meta, "codecs", ())
        if array.shards is None or len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
            return None
        shard = codecs[0]
        inner, index = shard.codecs, shard.index_codecs
        little = lambda c: isinstance(c, BytesCodec) and c.endian in (None, Endian.little)  # noqa: E731
        supported = (
            len(inner) == 3
            and little(inner[0])
            and isinstance(inner[1], BloscCodec)
            and isinstance(inner[2], Crc32cCodec)
            and len(index) == 2
            and little(index[0])
            and isinstance(index[1], Crc32cCodec)
            and shard.index_location == ShardingCodecIndexLocation.end
            # one chunk spans each other axis whole, so a shard is a run of chunks along the axis
            and all(
                array.shape[d] == array.shards[d] == shard.chunk_shape[d]
                for d in range(array.ndim)
                if d != axis
            )
            and array.config.write_empty_chunks  # zarr would leave all-fill chunks out; we write every chunk
            and sys.byteorder == "little"  # chunks are written as the machine holds them
            and meta.chunk_key_encoding.encode_chunk_key((0, 1)) == "c/0/1"
        )
        return cls(directory, array, axis, inner[1]) if supported else None

    def rows(self, shard: int) -> int:
        """Rows of shard ``shard`` inside the array: shard_rows, fewer for the last shard, 0 past the end."""
        return max(0, min(self.shard_rows, self._array.shape[self.axis] - shard * self.shard_rows))

    def write_many(self, shards: list[tuple[int, np.ndarray]], pool: Executor | None = None) -> None:
        """Encode and write each (shard number along the axis, block with all its rows inside the array), one
        atomic file per shard; the chunks of all of them are compressed at once on ``pool``. The last shard's
        final chunk is padded with the fill value; chunks past the array's end are left out."""
        chunks, counts = [], []
        for shard, block in shards:
            rows = self.rows(shard)
            want = list(self._array.shape)
            want[self.axis] = rows
            if rows == 0 or list(block.shape) != want or block.dtype != self._array.dtype:
                raise ValueError(  # raw bytes are written: zarr would cast, this must not guess
                    f"shard {shard} needs all its {rows} rows inside the array: a {tuple(want)} "
                    f"{self._array.dtype} block, got {block.shape} {block.dtype}"
                )
            counts.append(-(-rows // self.chunk_rows))
            chunks += [(block, start) for start in range(0, rows, self.chunk_rows)]
        # copy (each chunk is a strided slice), compress and checksum chunk by chunk on the pool
        encode = lambda job: _with_crc(self._blosc.encode(self._chunk(*job)))  # noqa: E731
        parts = iter(list(pool.map(encode, chunks) if pool else map(encode, chunks)))  # (blosc bytes, crc)
        for (shard, block), count in zip(shards, counts, strict=True):
            mine = [next(parts) for _ in range(count)]
            index = np.full((self.shard_rows // self.chunk_rows, 2), 2**64 - 1, dtype="<u8")  # absent chunks
            lengths = np.array([len(data) + 4 for data, _ in mine], dtype=np.uint64)
            index[:count, 1] = lengths  # (offset, length) per inner chunk, in file order
            index[:count, 0] = np.cumsum(lengths) - lengths
            coords = [0] * block.ndim
            coords[self.axis] = shard
            key = self.directory / self._array.metadata.encode_chunk_key(tuple(coords))
            _write_atomic(key, [piece for part in [*mine, _with_crc(index.tobytes())] for piece in part])

    def _chunk(self, block: np.ndarray, start: int) -> np.ndarray:
        """Rows [start, start + chunk_rows) of block, C-contiguous; the array's edge chunk padded as zarr does."""
        take = [slice(None)] * block.ndim
        take[self.axis] = slice(start, start + self.chunk_rows)
        chunk = block[tuple(take)]
        if (
            chunk.shape[self.axis] < self.chunk_rows
        ):  # zarr encodes edge chunks whole, fill value beyond the end
            pad = [(0, 0)] * block.ndim
            pad[self.axis] = (0, self.chunk_rows - chunk.shape[self.axis])
            chunk = np.pad(chunk, pad, constant_values=self._array.fill_value)
        return np.ascontiguousarray(chunk)


def _write_atomic(path: Path, pieces: Iterable[bytes | np.ndarray]) -> None:
    """Write the pieces to a temp file beside ``path`` and rename it over ``path``: the file is always wholly
    old or new. A kill leaves the temp file, which CacheWriter removes on resume (``*.partial``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.shard-{uuid.uuid4().hex}.partial")
    try:
        with open(tmp, "wb") as f:
            for piece in pieces:
                f.write(piece)
        os.replace(tmp, path)
    except BaseException:  # an error or Ctrl-C: no stray temp file (a SIGKILL's is removed on resume)
        tmp.unlink(missing_ok=True)
        raise
