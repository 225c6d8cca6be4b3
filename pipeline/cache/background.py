"""``AsyncWriter``: a teacher store's writes (``pipeline/cache/writer.py``) in one background thread."""

from __future__ import annotations

import queue
import threading

import torch

from pipeline.cache.writer import CacheWriter, Item

__all__ = ["AsyncWriter"]


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
