"""Inputs built ahead in background threads while the model runs: image preprocessing, not the GPU, bounds a
k-shot teacher on real images (a k = 4 Idefics2 prompt of 640 x 480 images takes ~0.2 s of one core to build,
benchmarks/prefetch.py).

`ahead(make, count, workers)` yields make(0), make(1), ... in order. With `workers` = 0 each is built when
asked for; otherwise `workers` threads build them, at most `workers` + 1 items ahead of the consumer.
`in_waves` builds `workers` items at a time together, then yields them with nothing built meanwhile: for a
consumer that times its own work (evaluate's latency), which building beside it would slow. Threads,
not processes: the pixel tensors a prompt carries (90 MB for k = 4 in Idefics2) need not cross a process
boundary, PIL and numpy release the GIL while they resize and normalise, and an error is raised here as
itself. A builder shared by the threads must be safe for it (PromptBuilder is: its caches are locked, and the
tokenizer is only read).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


def ahead(make: Callable[[int], T], count: int, workers: int = 0) -> Iterator[T]:
    """make(i) for i in range(count), in order, built by `workers` threads ahead of the consumer."""
    if workers <= 0:
        yield from (make(i) for i in range(count))
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="prefetch") as pool:
        pending = deque(pool.submit(make, i) for i in range(min(count, workers + 1)))
        following = len(pending)
        try:
            while pending:
                item = pending.popleft().result()  # a worker's exception is raised here
                if following < count:
                    pending.append(pool.submit(make, following))
                    following += 1
                yield item
        finally:  # the consumer stopped early or failed: do not build the rest
            for future in pending:
                future.cancel()


def in_waves(make: Callable[[int], T], count: int, workers: int = 0) -> Iterator[T]:
    """make(i) for i in range(count), in order: `workers` of them built at once by that many threads, then
    yielded one by one while no thread builds (`workers` = 0: each built when asked for)."""
    if workers <= 0:
        yield from (make(i) for i in range(count))
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="prefetch") as pool:
        for first in range(0, count, workers):
            wave = list(pool.map(make, range(first, min(first + workers, count))))
            while wave:
                yield wave.pop(0)
