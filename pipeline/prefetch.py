"""Inputs built ahead in background threads while the model runs: image preprocessing, not the GPU, bounds a
k-shot teacher on real images (a k = 4 Idefics2 prompt of 640 x 480 images takes ~0.2 s of one core to build,
benchmarks/prefetch.py).

`ahead(make, count, workers)` yields make(0), make(1), ... in order. With `workers` = 0 each is built when
asked for; otherwise `workers` threads build them, at most `workers` + 1 items ahead of the consumer. Threads,
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
