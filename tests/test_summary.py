"""Means and 95% intervals over seeds: the interval covers the true mean 95% of the time; the table reads the
evaluations as `mimic evaluate` writes them."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from pipeline.summary import Interval, summarize, summary_table, t975


def test_the_interval_covers_the_true_mean_95_percent_of_the_time():
    rng = random.Random(0)
    for n in (2, 3, 5, 12):
        trials, covered = 4000, 0
        for _ in range(trials):
            interval = Interval.of(rng.gauss(10.0, 3.0) for _ in range(n))
            covered += abs(interval.mean - 10.0) <= interval.half_width
        assert abs(covered / trials - 0.95) < 0.012, (n, covered / trials)  # 3.5 binomial standard errors


def test_interval_matches_its_formula_and_a_single_seed_has_no_spread():
    values = [40.0, 45.5, 51.0]
    interval = Interval.of(values)
    assert interval.mean == pytest.approx(statistics.fmean(values))
    assert interval.half_width == pytest.approx(t975(2) * statistics.stdev(values) / math.sqrt(3))
    assert t975(200) == 1.96 and t975(1) > t975(2) > t975(30) > 1.96
    assert Interval.of([7.0]).half_width == 0.0
    with pytest.raises(ValueError):
        t975(0)


def report(scores: dict, ms: dict) -> dict:
    latency = {m: {"ms_per_sample": ms[m], "parameters": 10 if m == "mimic" else 0} for m in scores}
    return {"metric": "accuracy", "score": scores, "latency": {**latency, "methods": list(scores)}}


def test_summary_keeps_the_method_order_and_refuses_mismatched_seeds():
    reports = {
        0: report({"zero_shot": 10.0, "mimic": 60.0}, {"zero_shot": 1.0, "mimic": 2.0}),
        1: report({"zero_shot": 14.0, "mimic": 70.0}, {"zero_shot": 3.0, "mimic": 2.0}),
    }
    summary = summarize(reports)
    assert list(summary["detail"]) == ["zero_shot", "mimic"] and summary["seeds"] == [0, 1]
    assert summary["mean"] == {"zero_shot": 12.0, "mimic": 65.0} and summary["detail"]["mimic"]["seeds"] == [
        60.0,
        70.0,
    ]
    assert (
        summary["ci95"]["mimic"]
        == summary["detail"]["mimic"]["ci95"]
        == round(t975(1) * 5 * math.sqrt(2) / math.sqrt(2), 4)
    )
    assert (
        summary["detail"]["zero_shot"]["ms_per_sample"] == 2.0
        and summary["detail"]["mimic"]["parameters"] == 10
    )
    table = summary_table(summary).splitlines()
    assert table[0].startswith("| method | accuracy (mean of 2 seeds) |") and table[3].startswith(
        "| mimic | 65.0 |"
    )
    reports[1] = report({"zero_shot": 14.0}, {"zero_shot": 3.0})
    with pytest.raises(ValueError, match="seed 1 scored"):
        summarize(reports)


def test_one_seed_shows_no_interval_rather_than_a_zero_width_one():
    summary = summarize({0: report({"icl": 93.8}, {"icl": 1.0})})
    row = summary_table(summary).splitlines()[2]
    assert row.startswith("| icl | 93.8 | n/a (one seed) | 93.8 |")
    two = summarize({0: report({"icl": 93.8}, {"icl": 1.0}), 1: report({"icl": 90.0}, {"icl": 1.0})})
    assert "n/a" not in summary_table(two)
