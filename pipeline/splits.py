"""The disjoint item sets a run uses: demonstrations, training queries, evaluation queries, validation queries."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from pipeline.config import DataConfig
from pipeline.data import DataSource, Item, load_items, split_support_query
from pipeline.errors import MimicError


@dataclass(frozen=True)
class Splits:
    support: list[Item]
    train: list[Item]
    eval: list[Item]
    val: list[Item]  # from the training pool, disjoint from support and train: choices of layer or heads


def data_source(mapping: dict, where: str) -> DataSource:
    try:
        return DataSource(**mapping)
    except TypeError as err:
        raise MimicError(f"{where}: {err}") from err


def make_splits(cfg: DataConfig) -> Splits:
    """Support and training queries from `cfg.train` (disjoint), evaluation queries from `cfg.eval`."""
    pool = load_items(data_source(cfg.train, "data.train"))
    if cfg.eval == cfg.train:  # one source: the three sets are cut from it, disjoint
        support, rest = split_support_query(
            pool, cfg.n_support, cfg.n_train + cfg.n_eval + cfg.n_val, cfg.seed
        )
        n = cfg.n_train + cfg.n_eval
        return Splits(support, rest[: cfg.n_train], rest[cfg.n_train : n], rest[n:])
    # the first n_train of a longer draw are the n_train of a shorter one: n_val leaves the cache as it is
    support, queries = split_support_query(pool, cfg.n_support, cfg.n_train + cfg.n_val, cfg.seed)
    train, val = queries[: cfg.n_train], queries[cfg.n_train :]
    held_out = load_items(data_source(cfg.eval, "data.eval"))
    if cfg.n_eval > len(held_out):
        raise MimicError(f"data.n_eval={cfg.n_eval} but data.eval has {len(held_out)} items")
    order = list(range(len(held_out)))
    random.Random(cfg.seed).shuffle(order)
    evaluation = [held_out[i] for i in sorted(order[: cfg.n_eval])]
    overlap = {i.id for i in support + train} & {i.id for i in evaluation}
    if overlap:
        raise MimicError(f"evaluation item {sorted(overlap)[0]!r} is also in the training pool (data.train)")
    return Splits(support, train, evaluation, val)


def target_answer(item: Item) -> str:
    """The answer a prompt shows: the most frequent reference (first on ties), as VQA's multiple-choice answer."""
    if not item.answers:
        raise MimicError(f"item {item.id!r} has no answer")
    counts = Counter(item.answers)
    return max(item.answers, key=lambda a: (counts[a], -item.answers.index(a)))
