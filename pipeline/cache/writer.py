"""Writing the teacher cache (``pipeline/cache/store.py`` holds the format): ``CacheWriter`` creates or resumes a
store and writes samples, directly or staged shard by shard; ``AsyncWriter`` (``pipeline/cache/background.py``)
feeds it from a background thread.

Crash safety (the writer may be SIGKILLed at any instant; a rerun must equal an uninterrupted run):
1. Every file write is atomic: zarr's LocalStore writes a temp file and renames it over the key
   (``_atomic_write`` in zarr/storage/_local.py, zarr 3.1), and so does ShardWriter for the shards written
   whole (``pipeline/cache/shards.py``), so a chunk or shard file is always wholly its old or its new version.
   A partial shard update is a read-modify-write of the whole file that ends in one rename.
2. There is one writer at a time (an flock on the store directory; AsyncWriter uses a single thread) and its
   writes are sequential, so each read-modify-write starts from the latest file and carries the neighbours'
   bytes over unchanged: rewriting sample i cannot alter an already-marked sample.
3. A sample's marker is written only after all its data files are in place (a staged sample may be half
   written, its rows up to a shard boundary, and is unmarked until the rest is in). On resume, unmarked samples are
   rewritten (the teacher is deterministic: same bytes) and leftover ``*.partial`` temp files are removed.
   The skeleton (metadata, offsets, attributes) is built in a temporary directory renamed into place, so a
   store path is never half-created.
Not covered: power loss or an OS crash (LocalStore does not fsync). The reader checks each sample's CRC and
zarr's crc32c codec guards every chunk and shard index, so such damage is reported rather than read.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.cache.codecs import TORCH_DTYPES, ArraySpec, Layout, checksum, encode_sample
from pipeline.cache.shards import ShardWriter
from pipeline.cache.store import _create, _name, _offsets, _Store, first_difference
from pipeline.errors import MimicError

__all__ = ["CacheWriter", "Part"]

# (i, states [L, T_i, H], topk_values [A_i, K] or None, topk_indices [A_i, K] or None): one sample to write
Item = tuple[int, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


@dataclass(frozen=True)
class Part:
    """One rank's part of a distributed extract: samples [first, stop) (already written ones are skipped).

    Ranks' parts are disjoint intervals. A file (shard or chunk) inside a part is written by that rank alone as
    it fills; the rows of the few files a part shares with its neighbours are held back and written at the end,
    one rank after the other (`write_held`), so no two ranks ever write one file at the same time. Each rank marks
    its samples in its own array (progress_<size>_<rank>); rank 0 folds them into sample_crc at the end."""

    rank: int
    size: int
    first: int
    stop: int


class CacheWriter:
    """Writes teacher samples into a store; reopening the same path resumes it, a complete store is left as is."""

    def __init__(self, store: _Store, part: Part | None = None, lock: int | None = None) -> None:
        self._store, self.part = store, part
        self.path, self.layout, self.complete = store.path, store.layout, store.complete
        self._lock_fd: int | None = lock  # a shared lock rank 0 kept from `prepare_parts`, or None
        self._closed = False
        if self.complete and lock is not None:  # nothing to write: the lock is not needed
            os.close(lock)
            self._lock_fd = None
        elif not self.complete and lock is None:
            self._lock(shared=part is not None)
            if (
                part is None
            ):  # a rank never removes another rank's temp files: rank 0 did before the ranks met
                remove_partial_files(self.path)
        self.done: set[int] = set(np.flatnonzero(store.all_marks() >= 0).tolist())
        self._marks = store.marks if part is None else store.progress[progress_name(part.size, part.rank)]
        self._held_rows = {spec.name: held_rows(store, spec, part) for spec in store.specs} if part else {}
        self._held: list[tuple[ArraySpec, int, int, np.ndarray]] = []  # rows of shared files, written last
        self._held_marks: dict[int, int] = {}  # samples with rows in a shared file -> their CRC
        self._boundary = boundary_samples(store, self._held_rows) if part else set()
        # encoded, not yet marked (write_many flush=False)
        self._staged: dict[int, dict[str, np.ndarray]] = {}
        self._token_written: dict[int, int] = {}  # staged sample -> token row its written part ends at
        self._shard_rows = self.layout.token_chunk * self.layout.shard_chunks
        # whole shards of the token axis bypass zarr's chunk pipeline; their chunks compress on all cores
        self._shards = {
            spec.name: ShardWriter.for_array(self.path / spec.name, store.arrays[spec.name], len(spec.lead))
            for spec in store.specs
            if spec.axis == "tokens"
        }
        self._pool: ThreadPoolExecutor | None = None  # compresses whole shards' chunks

    @classmethod
    def open(
        cls,
        path: str | Path,
        fingerprint: dict,
        layout: Layout,
        token_counts: list[int],
        answer_counts: list[int],
        part: Part | None = None,
        lock: int | None = None,
    ) -> CacheWriter:
        """Create the store at ``path``, or resume it if it holds the same fingerprint, layout and counts; with
        `part`, open one rank's part of a store rank 0 prepared (`prepare_parts`; rank 0 passes the `lock` it
        returned)."""
        path = Path(path)
        try:
            fingerprint = json.loads(json.dumps(fingerprint))
        except (TypeError, ValueError) as err:
            raise MimicError(
                f"cache fingerprint for {path} is not JSON-serialisable ({err}); use str/number/list/dict"
            ) from err
        tokens = _offsets(token_counts, "token_counts", 1)
        answers = _offsets(answer_counts, "answer_counts", 0)
        if len(tokens) != len(answers):
            raise MimicError(
                f"cache {path}: {len(tokens) - 1} token_counts but {len(answers) - 1} answer_counts"
            )
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()  # an empty directory (made by hand or a tool) counts as no store
        if not path.exists():
            _create(path, fingerprint, layout, tokens, answers)
        store = _Store(path, "r+")
        diff = first_difference(store.fingerprint, fingerprint)
        if diff:
            key, have, want = diff
            raise MimicError(
                f"{path} was written for another run: fingerprint '{key}' is {have!r} there but {want!r} now; "
                f"pick another cache path or delete {path}"
            )
        diff = first_difference(store.layout.to_dict(), layout.to_dict())
        if diff:
            raise MimicError(
                f"{path} has layout {diff[0]}={diff[1]!r}, this run wants {diff[2]!r}; "
                "pick another cache path or delete it"
            )
        for axis, want in (("tokens", tokens), ("answers", answers)):
            have = store.offsets[axis]
            if len(have) != len(want) or (have != want).any():
                raise MimicError(
                    f"{path} holds other {axis} counts per sample than this run; pick another cache path or delete it"
                )
        return cls(store, part, lock)

    @classmethod
    def prepare_parts(
        cls, path, fingerprint, layout, token_counts, answer_counts, size: int
    ) -> tuple[list[int], int | None]:
        """Rank 0 of a distributed extract, before the ranks open their parts: create or check the store, remove
        temp files of killed writes, add one progress array per rank. Returns the samples still missing and the
        store's lock, turned from exclusive to shared and kept (None for a complete store): rank 0 opens its part
        with it, so no other run can take the store between this and the ranks' shared locks."""
        writer = cls.open(path, fingerprint, layout, token_counts, answer_counts)
        try:
            if writer.complete:
                return [], None
            for rank in range(size):
                name = progress_name(size, rank)
                if name not in writer._store.progress:
                    n = len(writer)
                    writer._store.group.create_array(
                        name, shape=(n,), chunks=(n,), dtype="int64", fill_value=-1
                    )
            missing = writer.missing()
            fcntl.flock(writer._lock_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # never blocks: no other holder
            lock, writer._lock_fd = writer._lock_fd, None
            return missing, lock
        finally:
            writer.close()

    @classmethod
    def finish_parts(cls, path) -> None:
        """Rank 0, after every rank's `write_held`: fold the progress marks into sample_crc, drop the progress
        arrays and mark the store complete (refused while any sample is missing)."""
        store = _Store(Path(path), "r+")
        marks = store.all_marks()
        missing = int((marks < 0).sum())
        if missing:
            raise MimicError(
                f"{path}: {missing} of {len(store)} samples are missing after every rank finished"
            )
        store.marks[:] = marks
        for name in store.progress:
            shutil.rmtree(store.path / name)
        store.group.attrs["complete"] = True

    def _lock(self, shared: bool = False) -> None:
        fd = os.open(self.path, os.O_RDONLY)  # flock on the store directory itself: no extra file
        try:
            # the ranks of one distributed extract share the lock; a single writer holds it alone
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MimicError(
                f"{self.path} is being written by another process; wait for it or stop it"
            ) from None
        self._lock_fd = fd

    def __len__(self) -> int:
        return len(self._store)

    def missing(self) -> list[int]:
        """Samples not yet in the store, in order."""
        return [i for i in range(len(self)) if i not in self.done]

    def _check(
        self,
        i: int,
        states: torch.Tensor,
        values: torch.Tensor | None,
        indices: torch.Tensor | None,
        last_hidden: torch.Tensor | None = None,
        last_heads: torch.Tensor | None = None,
    ) -> None:
        lay, where = self.layout, f"{self.path}: sample {i}"
        t0, t1 = self._store.offsets["tokens"][i : i + 2]
        a0, a1 = self._store.offsets["answers"][i : i + 2]
        want = [("states", states, (lay.num_layers, int(t1 - t0), lay.hidden_size), TORCH_DTYPES[lay.dtype])]
        if lay.topk:
            rows = (int(a1 - a0), lay.topk)
            want += [
                ("topk_values", values, rows, TORCH_DTYPES[lay.topk_dtype]),
                ("topk_indices", indices, rows, torch.int64),
            ]
        elif values is not None or indices is not None:
            raise MimicError(f"{where}: the layout has topk=0, so pass no topk_values/topk_indices")
        if lay.last_layers:
            dtype = TORCH_DTYPES[lay.dtype]
            want += [
                ("last_hidden", last_hidden, (lay.last_layers, lay.hidden_size), dtype),
                ("last_heads", last_heads, (lay.last_layers, lay.head_width), dtype),
            ]
        for name, x, shape, dtype in want:
            if not isinstance(x, torch.Tensor):
                raise MimicError(f"{where}: {name} is missing (layout topk={lay.topk} needs it)")
            if tuple(x.shape) != shape or x.dtype != dtype:
                raise MimicError(
                    f"{where}: {name} is {tuple(x.shape)} {_name(x.dtype)}, the layout and counts need "
                    f"{shape} {_name(dtype)}; check the recorded layers, positions and teacher dtype"
                )

    def write(
        self,
        i: int,
        states: torch.Tensor,
        topk_values: torch.Tensor | None = None,
        topk_indices: torch.Tensor | None = None,
    ) -> None:
        """Store sample i: states [L, T_i, H], topk_values [A_i, K], topk_indices [A_i, K] int64."""
        self.write_many([(i, states, topk_values, topk_indices)])

    def write_many(
        self,
        samples: list[Item],
        flush: bool = True,
    ) -> None:
        """Store several samples (each run of consecutive indices is one slice write per array).

        With ``flush=False`` the samples are staged: only whole shards of the token axis are written now and
        the rest waits for the next call, so each shard file is compressed and written once instead of once
        per batch (the extract loop's cost). Staged samples are marked once their rows are all written;
        ``flush()`` writes whatever is left. A kill loses at most the staged samples, which stay missing.
        """
        if self.complete:
            raise MimicError(f"{self.path} is complete; nothing to write (delete it to recompute)")
        self._check_open()
        encoded: dict[int, dict[str, np.ndarray]] = {}
        for i, states, topk_values, topk_indices, *last in samples:
            if not 0 <= i < len(self):
                raise MimicError(
                    f"{self.path}: sample {i} is out of range (the store has {len(self)} samples)"
                )
            if i in self.done or i in self._staged or i in encoded:
                raise MimicError(
                    f"{self.path}: sample {i} is already written; skip the samples in writer.done"
                )
            self._check(i, states, topk_values, topk_indices, *last)
            parts = encode_sample(self.layout, states, topk_values, topk_indices, *last)
            # inf/NaN in a row end up in its scale (absmax) or among its outliers (topk ranks NaN first)
            if self.layout.codec == "int8" and not all(
                np.isfinite(parts[name]).all() for name in ("states_scale", "outlier_value") if name in parts
            ):
                raise MimicError(
                    f"{self.path}: sample {i}: states hold inf/NaN, which codec int8 cannot store; use lossless"
                )
            encoded[i] = parts
        self._staged.update(encoded)
        self._write_staged(all_rows=flush)
        offsets = self._store.offsets["tokens"]
        unwritten = sum(
            int(offsets[i + 1]) - self._token_written.get(i, int(offsets[i])) for i in self._staged
        )
        if unwritten >= 2 * self._shard_rows:  # scattered samples (a resumed run) may never fill a shard
            self.flush()

    def flush(self) -> None:
        """Write and mark every staged sample."""
        if self._staged:
            self._check_open()
        self._write_staged(all_rows=True)

    def _check_open(self) -> None:
        if self._closed:  # it no longer holds the store's lock
            raise MimicError(f"{self.path}: this writer is closed; reopen the store with CacheWriter.open")

    def _write_staged(self, all_rows: bool) -> None:
        """Write staged rows run by run: all of them, or only up to each run's last shard boundary on the
        token axis. Samples whose rows are all in are then marked, one marker write per run."""
        order = sorted(self._staged)
        runs = [[order[0]]] if order else []
        for i in order[1:]:
            if i == runs[-1][-1] + 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        offsets = self._store.offsets["tokens"]
        for run in runs:
            first = self._token_written.get(run[0], int(offsets[run[0]]))  # a run's head may be half written
            stop = int(offsets[run[-1] + 1])
            if not all_rows:
                stop = stop // self._shard_rows * self._shard_rows
                if stop <= first:
                    continue
            whole = [i for i in run if offsets[i + 1] <= stop]  # samples that end before the cut
            for spec in self._store.specs:
                if spec.axis == "tokens":
                    start, end, ids = first, stop, [i for i in run if offsets[i] < stop]
                else:  # the answer and sample axes are small: write the whole samples' rows, aligned or not
                    if not whole:
                        continue
                    (start, end), ids = self._store.bounds(spec, whole[0], whole[-1] + 1), whole
                if end > start:
                    block = np.concatenate([self._staged[i][spec.name] for i in ids], axis=len(spec.lead))
                    base = self._store.bounds(spec, ids[0], ids[0] + 1)[0]
                    self._put(spec, start, end, spec.take(block, start - base, end - base))
            if len(whole) < len(run):
                self._token_written[run[len(whole)]] = stop
            if whole:  # only now do these samples count as written: one marker write for the whole run
                crcs = [checksum(self.layout, self._staged[i]) for i in whole]
                held = [i for i in whole if i in self._boundary]  # marked once their shared files are in
                self._held_marks.update({i: c for i, c in zip(whole, crcs) if i in self._boundary})
                marks = self._marks[whole[0] : whole[-1] + 1]
                new = np.array(crcs)
                if held:
                    new = np.where(np.isin(np.array(whole), held), marks, new)
                self._marks[whole[0] : whole[-1] + 1] = new
                for i in whole:
                    del self._staged[i]
                    self._token_written.pop(i, None)
                self.done.update(i for i in whole if i not in self._boundary)

    def _put(self, spec: ArraySpec, start: int, end: int, rows: np.ndarray) -> None:
        """Write ``rows`` to rows [start, end) of spec's array, less the rows of files shared with another rank
        (held for `write_held`)."""
        for a, b in self._held_rows.get(spec.name, ()):
            lo, hi = max(a, start), min(b, end)
            if lo < hi:
                self._held.append((spec, lo, hi, spec.take(rows, lo - start, hi - start).copy()))
                if lo > start:
                    self._put(spec, start, lo, spec.take(rows, 0, lo - start))
                if hi < end:
                    self._put(spec, hi, end, spec.take(rows, hi - start, end - start))
                return
        self._put_rows(spec, start, end, rows)

    def write_held(self) -> None:
        """Write the rows of the files this part shares with its neighbours and mark the samples they complete.
        The ranks call it one after another (distributed.barrier between them): each file has one writer."""
        self.flush()
        for spec, a, b, rows in self._held:
            self._store.arrays[spec.name][spec.rows(a, b)] = rows
        self._held.clear()
        for i, crc in sorted(self._held_marks.items()):
            self._marks[i] = crc
            self.done.add(i)
        self._held_marks.clear()

    def _put_rows(self, spec: ArraySpec, start: int, end: int, rows: np.ndarray) -> None:
        """Write ``rows`` to rows [start, end) of spec's array: the shards it covers whole by ShardWriter, the rest
        (a head or tail shard written in part) through zarr."""
        shards, zarr_rows = self._shards.get(spec.name), [(start, end)]
        if shards is not None:
            n = shards.shard_rows
            first, last = -(-start // n), end // n  # shards [first, last) are covered whole ...
            if shards.rows(last) and last * n + shards.rows(last) == end:
                last += 1  # ... and so is the array's last, shorter shard when rows reach the end
            if last > first:
                if self._pool is None:  # started by the first whole-shard write
                    self._pool = ThreadPoolExecutor(min(8, _usable_cores()), "cache-encode")
                whole = [
                    (shard, spec.take(rows, shard * n - start, shard * n + shards.rows(shard) - start))
                    for shard in range(first, last)
                ]
                shards.write_many(whole, self._pool)
                zarr_rows = [(start, first * n), (min(last * n, end), end)]
        for a, b in zarr_rows:
            if b > a:
                self._store.arrays[spec.name][spec.rows(a, b)] = spec.take(rows, a - start, b - start)

    def finish(self) -> None:
        """Mark the store complete (every sample must be in) and release it."""
        if self.complete:
            return
        self._check_open()
        self.flush()
        if self.part is not None:
            raise MimicError("a distributed part is finished by write_held and rank 0's finish_parts")
        if self._store.progress:  # marks left by a killed distributed extract
            self._store.marks[:] = self._store.all_marks()
            for name in self._store.progress:
                shutil.rmtree(self.path / name)
        missing = int((self._store.marks[:] < 0).sum())
        if missing:
            raise MimicError(
                f"{self.path}: cannot finish, {missing} of {len(self)} samples are missing; "
                "write writer.missing() first"
            )
        self._store.group.attrs["complete"] = True
        self.complete = True
        self.close()

    def close(self, wait: bool = True) -> None:
        """Release the write lock (a complete or killed writer holds none) and the compression threads; a closed
        writer writes nothing more (reopen the store to go on)."""
        self._closed = True
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=wait)
            self._pool = None

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close(wait=False)  # garbage collection may run this on any thread


def progress_name(size: int, rank: int) -> str:
    return f"progress_{size}_{rank}"


def remove_partial_files(path: Path) -> None:
    for partial in path.rglob("*.partial"):  # temp files of writes cut short by a kill
        partial.unlink()


def _file_rows(store: _Store, spec: ArraySpec) -> int:
    """Rows of spec's ragged axis per file: a shard for sharded arrays, a chunk otherwise."""
    array = store.arrays[spec.name]
    shards = getattr(array, "shards", None)
    return (shards or array.chunks)[len(spec.lead)]


def held_rows(store: _Store, spec: ArraySpec, part: Part) -> list[tuple[int, int]]:
    """Row intervals of spec's array that lie in files shared with rows outside samples [first, stop)."""
    lo, hi = store.bounds(spec, part.first, part.stop) if part.stop > part.first else (0, 0)
    total, n = int(store.offsets[spec.axis][-1]), _file_rows(store, spec)
    held = []
    if hi > lo and lo % n:
        held.append((lo, min(hi, (lo // n + 1) * n)))
    if hi > lo and hi % n and hi < total and (not held or hi > held[-1][1]):
        held.append((max(lo, hi // n * n, held[-1][1] if held else lo), hi))
    return held


def boundary_samples(store: _Store, held: dict[str, list[tuple[int, int]]]) -> set[int]:
    """Samples with at least one row in a held interval of any array."""
    out: set[int] = set()
    for spec in store.specs:
        offsets = store.offsets[spec.axis]
        for a, b in held.get(spec.name, ()):
            first = int(np.searchsorted(offsets, a, side="right")) - 1
            last = int(np.searchsorted(offsets, b, side="left"))
            out.update(range(max(first, 0), min(last, len(store))))
    return out


def _usable_cores() -> int:
    """Cores this process may run on (the affinity mask where the OS has one, as in containers)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
