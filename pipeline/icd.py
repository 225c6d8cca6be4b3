"""In-context demonstration (ICD) sampling: for each training query, M sets of k support items.

A query's sets depend only on (seed, query id, support set), never on which other queries are asked
for, so growing the query list keeps every existing set. A query never demonstrates itself, even
when the support set contains it (matched by item id).

A strategy is one function registered in STRATEGIES, called once per query:

    strategy(query_id, eligible, support, k, m, rng) -> m lists of k indices into `support`

`eligible` holds the support indices the strategy may use (the query's own id removed, at least k of
them); `rng` is a `random.Random` seeded for this query. A similarity strategy (e.g. nearest support
images by CLIP feature) ranks `eligible` against the query's features, looked up by `query_id` in a
store it closes over, and uses `rng` only to break ties.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence

from pipeline.data import Item
from pipeline.errors import MimicError

Strategy = Callable[[str, Sequence[int], Sequence[Item], int, int, random.Random], list[list[int]]]


def sample_random(
    query_id: str, eligible: Sequence[int], support: Sequence[Item], k: int, m: int, rng: random.Random
) -> list[list[int]]:
    """M independent uniform draws of k distinct eligible indices (sets may repeat across the M draws)."""
    return [rng.sample(eligible, k) for _ in range(m)]


STRATEGIES: dict[str, Strategy] = {
    "random": sample_random,
}


def query_rng(seed: int, query_id: str) -> random.Random:
    """A generator seeded from (seed, query id) alone: stable across Python runs and query orderings."""
    digest = hashlib.sha256(f"{seed}\x00{query_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def sample_icd_sets(
    query_ids: list[str], support: list[Item], k: int, m: int, seed: int, strategy: str = "random"
) -> list[list[list[int]]]:
    """For each query id, `m` sets of `k` demonstrations as indices into `support`: [queries][m][k].

    No set contains the query itself or repeats a demonstration; k = 0 gives empty sets.
    """
    if strategy not in STRATEGIES:
        raise MimicError(f"unknown ICD strategy '{strategy}'; use one of {', '.join(STRATEGIES)}")
    if k < 0 or m < 1:
        raise MimicError(f"ICD sampling needs k >= 0 and m >= 1, got k={k}, m={m}")
    sample = STRATEGIES[strategy]
    everyone = tuple(range(len(support)))
    positions: dict[str, list[int]] = {}
    for index, item in enumerate(support):
        positions.setdefault(item.id, []).append(index)

    sets = []
    for query_id in query_ids:
        own = set(positions.get(query_id, ()))
        eligible = tuple(i for i in everyone if i not in own) if own else everyone
        if len(eligible) < k:
            raise MimicError(
                f"support set has {len(eligible)} items eligible for query '{query_id}' (itself excluded) "
                f"but k={k} demonstrations are needed; lower k or enlarge the support set"
            )
        drawn = sample(query_id, eligible, support, k, m, query_rng(seed, query_id))
        _check_sets(drawn, strategy, query_id, own, len(support), k, m)
        sets.append([list(s) for s in drawn])
    return sets


def _check_sets(
    drawn: list[list[int]], strategy: str, query_id: str, own: set[int], n_support: int, k: int, m: int
) -> None:
    """Hold every strategy, built in or added, to the contract the training loop relies on."""
    if len(drawn) != m:
        raise MimicError(
            f"ICD strategy '{strategy}' returned {len(drawn)} sets for query '{query_id}', expected m={m}"
        )
    for demos in drawn:
        valid = all(isinstance(i, int) and 0 <= i < n_support and i not in own for i in demos)
        if len(demos) != k or len(set(demos)) != k or not valid:
            raise MimicError(
                f"ICD strategy '{strategy}' returned {list(demos)} for query '{query_id}'; "
                f"expected {k} distinct eligible support indices (never the query itself)"
            )
