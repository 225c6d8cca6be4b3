"""The disjoint item sets a run uses: demonstrations, training queries, evaluation queries, validation queries."""

from __future__ import annotations

import os
import random
import typing
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

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
    """`data.train` or `data.eval` as a DataSource: every key known and of its field's type (paths may start
    with ~), or one line naming the first that is not."""
    if not isinstance(mapping, dict):
        raise MimicError(
            f"{where} must be a mapping such as {{kind: vqa, questions_json: ...}}, got {mapping!r}"
        )
    hints = typing.get_type_hints(DataSource)
    unknown = sorted(set(mapping) - set(hints))
    if unknown or "kind" not in mapping:
        problem = f"unknown keys {unknown}" if unknown else "missing key 'kind'"
        raise MimicError(f"{where}: {problem}; its keys are {', '.join(hints)}")
    source = DataSource(**{n: _field(value, hints[n], f"{where}.{n}") for n, value in mapping.items()})
    if source.metric is not None and source.kind != "table":
        raise MimicError(
            f"{where}.metric: only a table takes a metric ({source.kind} has its official metric)"
        )
    return source


def _field(value, kind, where: str):
    allowed = set(typing.get_args(kind)) or {kind}
    if value is None and type(None) in allowed:
        return None
    if Path in allowed and isinstance(value, (str, Path)):
        return os.path.expanduser(str(value))
    if str in allowed and isinstance(value, str):
        return value
    if int in allowed and isinstance(value, int) and not isinstance(value, bool):
        return value
    want = "a path" if Path in allowed else "text" if str in allowed else "a whole number"
    raise MimicError(f"{where} must be {want}, got {value!r}")


def make_splits(cfg: DataConfig) -> Splits:
    """Support and training queries from `cfg.train` (disjoint), evaluation queries from `cfg.eval`."""
    train_source, eval_source = data_source(cfg.train, "data.train"), data_source(cfg.eval, "data.eval")
    # one source: the same data, however written (a metric to score it with, ~ or the full path)
    one_source = replace(train_source, metric=None) == replace(eval_source, metric=None)
    pool = load_items(train_source)
    needed = cfg.n_support + cfg.n_train + cfg.n_val + (cfg.n_eval if one_source else 0)
    if needed > len(pool):
        sizes = "n_support + n_train + n_val" + (" + n_eval (data.eval is data.train)" if one_source else "")
        raise MimicError(f"data.train has {len(pool)} items, but data.{sizes} = {needed}; lower them")
    if one_source:  # the four sets are cut from it, disjoint
        # the evaluation queries come first after the support set: they do not move when n_train or n_val
        # change (a sweep over them scores one test set); the training queries are nested as below
        support, rest = split_support_query(
            pool, cfg.n_support, cfg.n_train + cfg.n_eval + cfg.n_val, cfg.seed
        )
        n = cfg.n_eval + cfg.n_train
        return Splits(support, rest[cfg.n_eval : n], rest[: cfg.n_eval], rest[n:])
    # the first n_train of a longer draw are the n_train of a shorter one: n_val leaves the cache as it is
    support, queries = split_support_query(pool, cfg.n_support, cfg.n_train + cfg.n_val, cfg.seed)
    train, val = queries[: cfg.n_train], queries[cfg.n_train :]
    held_out = load_items(eval_source)
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
