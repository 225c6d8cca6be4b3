"""ICD sets are reproducible, never demonstrate the query, and do not move when other queries are added."""

from __future__ import annotations

import random

import pytest

from pipeline.data import Item
from pipeline.errors import MimicError
from pipeline.icd import STRATEGIES, query_rng, sample_icd_sets

SUPPORT = [Item(f"s{n}", (), f"q{n}", (str(n),)) for n in range(12)]


def test_sets_have_the_requested_shape_and_no_repeats():
    sets = sample_icd_sets(["a", "b", "c"], SUPPORT, k=4, m=3, seed=0)
    assert len(sets) == 3
    for per_query in sets:
        assert len(per_query) == 3
        for demos in per_query:
            assert len(demos) == 4 and len(set(demos)) == 4
            assert all(0 <= i < len(SUPPORT) for i in demos)


def test_sets_are_reproducible_and_depend_on_the_seed():
    first = sample_icd_sets(["a", "b"], SUPPORT, k=3, m=2, seed=7)
    assert first == sample_icd_sets(["a", "b"], SUPPORT, k=3, m=2, seed=7)
    assert first != sample_icd_sets(["a", "b"], SUPPORT, k=3, m=2, seed=8)


def test_random_strategy_matches_an_independent_draw():
    (sets,) = sample_icd_sets(["a"], SUPPORT, k=3, m=2, seed=1)
    rng = query_rng(1, "a")
    assert sets == [rng.sample(range(12), 3), rng.sample(range(12), 3)]


def test_query_in_support_is_never_its_own_demonstration():
    query_ids = [item.id for item in SUPPORT]  # every support item is also a query
    for seed in range(5):
        sets = sample_icd_sets(query_ids, SUPPORT, k=11, m=4, seed=seed)
        for query_index, per_query in enumerate(sets):
            for demos in per_query:
                assert query_index not in demos
                assert sorted(demos) == [i for i in range(12) if i != query_index]  # k = all eligible


def test_query_excluded_by_id_even_when_listed_twice():
    support = [*SUPPORT, Item("s3", (), "dup", ("x",))]
    (per_query,) = sample_icd_sets(["s3"], support, k=11, m=2, seed=0)
    for demos in per_query:
        assert 3 not in demos and 12 not in demos


def test_sets_stable_when_other_queries_are_added_or_reordered():
    alone = sample_icd_sets(["q"], SUPPORT, k=3, m=2, seed=5)[0]
    crowd = sample_icd_sets(["x", "s1", "q", "y"], SUPPORT, k=3, m=2, seed=5)
    assert crowd[2] == alone
    assert sample_icd_sets(["y", "q"], SUPPORT, k=3, m=2, seed=5)[1] == alone


def test_k_zero_gives_empty_sets():
    assert sample_icd_sets(["a", "s0"], SUPPORT, k=0, m=3, seed=0) == [[[], [], []], [[], [], []]]
    assert sample_icd_sets(["a"], [], k=0, m=1, seed=0) == [[[]]]


def test_errors_are_one_line():
    cases = [
        (dict(k=12), ["11 items eligible", "'s0'", "k=12"]),  # s0 excludes itself
        (dict(k=-1), ["k=-1"]),
        (dict(m=0), ["m=0"]),
        (dict(strategy="similar"), ["'similar'", "random"]),
    ]
    for overrides, parts in cases:
        arguments = dict(query_ids=["s0"], support=SUPPORT, k=2, m=1, seed=0) | overrides
        with pytest.raises(MimicError) as excinfo:
            sample_icd_sets(**arguments)
        message = str(excinfo.value)
        assert "\n" not in message
        assert all(part in message for part in parts), message


def test_registered_strategy_is_used_and_held_to_the_contract(monkeypatch):
    def first_k(query_id, eligible, support, k, m, rng: random.Random):
        return [list(eligible[:k]) for _ in range(m)]

    monkeypatch.setitem(STRATEGIES, "first", first_k)
    assert sample_icd_sets(["s0", "z"], SUPPORT, k=2, m=2, seed=0, strategy="first") == [
        [[1, 2]] * 2,
        [[0, 1]] * 2,
    ]

    def cheat(query_id, eligible, support, k, m, rng):
        return [list(range(k))] * m  # includes index 0 = query "s0"

    monkeypatch.setitem(STRATEGIES, "cheat", cheat)
    with pytest.raises(MimicError) as excinfo:
        sample_icd_sets(["s0"], SUPPORT, k=2, m=1, seed=0, strategy="cheat")
    assert "'cheat'" in str(excinfo.value) and "'s0'" in str(excinfo.value)
