"""Writing the teacher cache (``pipeline/cache/store.py`` holds the format): ``CacheWriter`` creates or resumes a
store and writes samples, directly or staged shard by shard; ``AsyncWriter`` feeds it from a background thread.

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
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from pipeline.cache.codecs import TORCH_DTYPES, ArraySpec, Layout, checksum, encode_sample
from pipeline.cache.shards import ShardWriter
from pipeline.cache.store import _create, _name, _offsets, _Store, first_difference
from pipeline.errors import MimicError

__all__ = ["AsyncWriter", "CacheWriter"]

# (i, states [L, T_i, H], topk_values [A_i, K] or None, topk_indices [A_i, K] or None): one sample to write
Item = tuple[int, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


class CacheWriter:
    """Writes teacher samples into a store; reopening the same path resumes it, a complete store is left as is."""

    def __init__(self, store: _Store) -> None:
        self._store = store
        self.path, self.layout, self.complete = store.path, store.layout, store.complete
        self._lock_fd: int | None = None
        self._closed = False
        if not self.complete:
            self._lock()
            for partial in self.path.rglob("*.partial"):  # temp files of writes cut short by a kill
                partial.unlink()
        self.done: set[int] = set(np.flatnonzero(store.marks[:] >= 0).tolist())
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
    ) -> CacheWriter:
        """Create the store at ``path``, or resume it if it holds the same fingerprint, layout and counts."""
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
        return cls(store)

    def _lock(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)  # flock on the store directory itself: no extra file
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
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
                self._store.marks[whole[0] : whole[-1] + 1] = np.array(crcs)
                for i in whole:
                    del self._staged[i]
                    self._token_written.pop(i, None)
                self.done.update(whole)

    def _put(self, spec: ArraySpec, start: int, end: int, rows: np.ndarray) -> None:
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


def _usable_cores() -> int:
    """Cores this process may run on (the affinity mask where the OS has one, as in containers)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class AsyncWriter:
    """Runs ``writer.write_many`` in one background thread so the teacher's next forward overlaps compression
    and I/O. Writes are staged (whole shards as they fill); ``close`` or leaving the ``with`` block, by an
    exception too, writes the rest, so an interrupted run keeps every sample the teacher finished.

    Submitted tensors are moved to CPU (CPU tensors are not copied: do not modify them after submit). An error
    in the thread is raised by the next ``submit`` or by ``close``. One thread keeps writes sequential, which
    the store's crash safety relies on; Ctrl-C in the caller never cuts a write short. Most of a write (Blosc,
    crc32c, file I/O) runs without the GIL, so even a CPU teacher loses nothing to it (benchmarks/extract.py).
    """

    def __init__(self, writer: CacheWriter, max_pending: int = 4) -> None:
        self.writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, max_pending))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="cache-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (samples := self._queue.get()) is not None:
            self._call(
                self.writer.write_many, samples, False
            )  # staged: whole shards are written as they fill
        self._call(self.writer.flush)

    def _call(self, fn, *args) -> None:
        if self._error is not None:  # after a failure, queued jobs are dropped
            return
        try:
            fn(*args)
        except BaseException as err:  # handed to the caller's thread
            self._error = err

    def _raise_pending(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(
        self,
        i: int,
        states: torch.Tensor,
        topk_values: torch.Tensor | None = None,
        topk_indices: torch.Tensor | None = None,
    ) -> None:
        """Queue sample i for writing; blocks while ``max_pending`` writes are queued."""
        self.submit_many([(i, states, topk_values, topk_indices)])

    def submit_many(self, samples: list[Item]) -> None:
        """Queue several samples (a batch of the teacher) as one `write_many`; blocks while full."""
        self._raise_pending()
        cpu = [(i, *(None if x is None else x.detach().to("cpu") for x in rest)) for i, *rest in samples]
        while True:
            try:
                self._queue.put(cpu, timeout=0.1)
                break
            except queue.Full:
                self._raise_pending()

    def close(self) -> None:
        """Wait for every queued write and write what is staged; raise the first error the thread met."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise_pending()

    def __enter__(self) -> AsyncWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:  # keep the caller's exception; the writes that made it in stay valid
            self._queue.put(None)
            self._thread.join()
