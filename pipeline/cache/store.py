"""The teacher cache: a Zarr v3 store of per-sample hidden states and top-k logits, written once, read many times.

Layout (ragged): the tokens of all samples are concatenated along one axis. ``token_offsets`` [N+1] and
``answer_offsets`` [N+1] are fixed when the store is created (the counts are known before the teacher runs),
so every array is preallocated and samples may be written in any order. The arrays of each codec are listed
in ``pipeline/cache/codecs.py``: token-axis arrays are [L, total_tokens, ...], chunked a few MiB along tokens
(all layers x hidden in each chunk) and sharded ``shard_chunks`` chunks per file. ``sample_crc`` [N] int64 is
the per-sample marker: -1 = not written, else the CRC-32 of the sample's stored bytes. Group attributes:
``format``, ``fingerprint`` (the caller's dict), ``layout`` and ``complete``.

Writing (and its crash safety) lives in ``pipeline/cache/writer.py``; this module holds the format, store
creation, the reader and ``store_stats``.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
import zarr

from pipeline.cache.codecs import (
    TORCH_DTYPES,
    ArraySpec,
    Layout,
    array_specs,
    checksum,
    decode_last,
    decode_sample,
)
from pipeline.errors import MimicError

__all__ = ["CacheReader", "Layout", "store_stats"]

FORMAT = "mimic-teacher-cache/1"
_ABSENT = "<absent>"
Sample = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def _compressors() -> list:
    return [zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"), zarr.codecs.Crc32cCodec()]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _canonical(value: object) -> str:
    return json.dumps(value, sort_keys=True)


def first_difference(have: dict, want: dict) -> tuple[str, object, object] | None:
    """The first key (in ``want``'s order, then ``have``'s extras) whose values differ, with both values."""
    for key in [*want, *(k for k in have if k not in want)]:
        a, b = have.get(key, _ABSENT), want.get(key, _ABSENT)
        if _canonical(a) != _canonical(b):
            return key, a, b
    return None


def _offsets(counts: list[int], name: str, minimum: int) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 1 or len(counts) == 0 or (counts < minimum).any():
        raise MimicError(f"cache {name}: need a non-empty list of integers >= {minimum}, one per sample")
    return np.concatenate([[0], np.cumsum(counts)])


class _Store:
    """An open store: group, layout, offsets and arrays, shared by writer, reader and store_stats."""

    def __init__(self, path: Path, mode: str) -> None:
        try:
            group = zarr.open_group(path, mode=mode, zarr_format=3)
            attrs = group.attrs.asdict()
            layout = Layout.from_dict(attrs["layout"]) if attrs.get("format") == FORMAT else None
        except Exception as err:
            raise MimicError(
                f"{path} is not a MimIC teacher cache ({type(err).__name__}); pick another path or delete it"
            ) from err
        if layout is None:
            raise MimicError(
                f"{path} is not a MimIC teacher cache (format is not {FORMAT}); pick another path or delete it"
            )
        self.layout = layout
        self.path, self.group = path, group
        self.fingerprint: dict = attrs["fingerprint"]
        self.complete = bool(attrs["complete"])
        self.offsets = {"tokens": group["token_offsets"][:], "answers": group["answer_offsets"][:]}
        self.offsets["samples"] = np.arange(len(self.offsets["tokens"]), dtype=np.int64)
        self.specs = array_specs(self.layout)
        # write_empty_chunks: skip zarr's per-chunk "all fill value?" scan; states are never all zero
        self.arrays = {
            spec.name: group[spec.name].with_config({"write_empty_chunks": True}) for spec in self.specs
        }
        self.marks = group["sample_crc"]
        # a distributed extract's per-rank marks (progress_<size>_<rank>), merged into sample_crc when complete
        self.progress = {
            name: group[name] for name in sorted(group.array_keys()) if name.startswith("progress_")
        }

    def all_marks(self) -> np.ndarray:
        """sample_crc with every rank's progress marks folded in: >= 0 where a sample is written."""
        marks = self.marks[:]
        for array in self.progress.values():
            extra = array[:]
            marks = np.where(extra >= 0, extra, marks)
        return marks

    def __len__(self) -> int:
        return len(self.offsets["tokens"]) - 1

    def bounds(self, spec: ArraySpec, i0: int, i1: int) -> tuple[int, int]:
        """Rows of spec's ragged axis that samples [i0, i1) occupy."""
        offsets = self.offsets[spec.axis]
        return int(offsets[i0]), int(offsets[i1])


def _create(path: Path, fingerprint: dict, layout: Layout, tokens: np.ndarray, answers: np.ndarray) -> None:
    """Build the empty store in a temporary directory, then rename it to ``path`` in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.creating-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = path.parent / f".{path.name}.creating-{uuid.uuid4().hex[:8]}"
    group = zarr.open_group(tmp, mode="w-", zarr_format=3)
    n = len(tokens) - 1
    for name, offsets in (("token_offsets", tokens), ("answer_offsets", answers)):
        group.create_array(name, shape=offsets.shape, chunks=offsets.shape, dtype="int64")[:] = offsets
    group.create_array("sample_crc", shape=(n,), chunks=(min(n, 1 << 16),), dtype="int64", fill_value=-1)
    for spec in array_specs(layout):
        if spec.axis == "tokens":
            rows, chunk, shard = int(tokens[-1]), layout.token_chunk, layout.token_chunk * layout.shard_chunks
        elif spec.axis == "samples":
            rows, chunk, shard = n, min(n, layout.sample_chunk) or 1, None
        else:
            rows, chunk, shard = int(answers[-1]), layout.chunk_answers, None
        group.create_array(
            spec.name,
            shape=spec.shape(rows),
            chunks=spec.shape(chunk),
            shards=spec.shape(shard) if shard else None,
            dtype=spec.dtype,
            compressors=_compressors(),
            fill_value=0,
        )
    group.attrs.update(
        {"format": FORMAT, "fingerprint": fingerprint, "layout": layout.to_dict(), "complete": False}
    )
    try:
        os.rename(tmp, path)
    except OSError:  # another process created it first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)


class CacheReader:
    """Reads a complete store: ``read(i)`` -> (states [L, T_i, H] in the teacher dtype, topk_values, topk_indices)."""

    def __init__(self, store: _Store, verify: bool) -> None:
        self._store, self.verify = store, verify
        self.path, self.layout, self.fingerprint = store.path, store.layout, store.fingerprint
        self._crc = store.marks[:]
        self.token_counts: list[int] = np.diff(store.offsets["tokens"]).tolist()
        self.answer_counts: list[int] = np.diff(store.offsets["answers"]).tolist()

    @classmethod
    def open(cls, path: str | Path, expect: dict | None = None, verify: bool = True) -> CacheReader:
        """Open a complete store; ``expect`` is the fingerprint this run needs; ``verify`` checks CRCs on read."""
        path = Path(path)
        if not path.exists():
            raise MimicError(f"teacher cache {path} does not exist; run mimic extract first")
        store = _Store(path, "r")
        if not store.complete:
            written = int((store.marks[:] >= 0).sum())
            raise MimicError(
                f"{path} is incomplete ({written} of {len(store)} samples); rerun mimic extract to finish it"
            )
        diff = (
            first_difference(store.fingerprint, json.loads(json.dumps(expect)))
            if expect is not None
            else None
        )
        if diff:
            key, have, want = diff
            what = "model" if "model" in key else "data" if "content" in key else key
            raise MimicError(
                f"{path}: fingerprint '{key}' differs (cache {have!r}, expected {want!r}): the cache was written for "
                f"another {what}; rerun mimic extract with this configuration"
            )
        return cls(store, verify)

    def __len__(self) -> int:
        return len(self._store)

    def read(self, i: int) -> Sample:
        return self.read_many([i])[0]

    def read_many(self, indices: list[int]) -> list[Sample]:
        """Samples in the order asked; samples whose chunks touch are fetched in one range read."""
        order = sorted(set(int(i) for i in indices))
        if order and not (0 <= order[0] and order[-1] < len(self)):
            raise MimicError(f"{self.path}: sample index out of range (the store has {len(self)} samples)")
        tokens, chunk = self._store.offsets["tokens"], self.layout.token_chunk
        groups: list[list[int]] = []
        for i in order:
            if groups and tokens[i] // chunk <= (tokens[groups[-1][-1] + 1] - 1) // chunk + 1:
                groups[-1].append(i)
            else:
                groups.append([i])
        out: dict[int, Sample] = {}
        for group in groups:
            out.update(self._read_group(group))
        return [out[int(i)] for i in indices]

    def read_last(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples [start, stop)'s last-prompt-token signals: layer outputs [n, L, hidden] and head outputs
        [n, L, heads x head_dim] (extract.last_token)."""
        if not self.layout.last_layers:
            raise MimicError(
                f"{self.path} holds no last-token signals: extract with extract.last_token: true"
            )
        parts = {name: self._store.arrays[name][start:stop] for name in ("last_hidden", "last_heads")}
        return decode_last(self.layout, parts)

    def _read_group(self, ids: list[int]) -> dict[int, Sample]:
        store, i0, i1 = self._store, ids[0], ids[-1] + 1
        named = f"sample {i0}" if len(ids) == 1 else f"samples {i0}..{ids[-1]}"
        blocks = {}
        for spec in store.specs:
            start, stop = store.bounds(spec, i0, i1)
            try:
                blocks[spec.name] = (start, store.arrays[spec.name][spec.rows(start, stop)])
            except Exception as err:
                raise MimicError(
                    f"{self.path}: {named}: array {spec.name} is corrupt ({type(err).__name__}); "
                    "delete the store and rerun mimic extract"
                ) from err
        out = {}
        for i in ids:
            parts = {}
            for spec in store.specs:
                base, block = blocks[spec.name]
                start, stop = store.bounds(spec, i, i + 1)
                parts[spec.name] = spec.take(block, start - base, stop - base)
            if self.verify and checksum(self.layout, parts) != self._crc[i]:
                raise MimicError(
                    f"{self.path}: sample {i} fails its checksum (corrupt data); "
                    "delete the store and rerun mimic extract"
                )
            out[i] = decode_sample(self.layout, parts)
        return out


def store_stats(path: str | Path) -> dict:
    """Size figures of a store: bytes on disk, raw bytes in the teacher dtypes, ratio, disk bytes per state value."""
    path = Path(path)
    store = _Store(path, "r")
    lay = store.layout
    size = lambda p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    n_tokens, n_answers = int(store.offsets["tokens"][-1]), int(store.offsets["answers"][-1])
    state_values = lay.num_layers * n_tokens * lay.hidden_size
    raw = state_values * TORCH_DTYPES[lay.dtype].itemsize
    raw += n_answers * lay.topk * (TORCH_DTYPES[lay.topk_dtype].itemsize + 8)
    disk = size(path)
    states_disk = sum(size(path / spec.name) for spec in store.specs if spec.axis == "tokens")
    return {
        "samples": len(store),
        "state_values": state_values,
        "bytes_on_disk": disk,
        "raw_bytes": raw,
        "compression_ratio": raw / disk,
        "bytes_per_value": states_disk / max(1, state_values),
    }
