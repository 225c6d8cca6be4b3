"""Per-method scores over seeds: the mean and its 95% confidence interval (Student's t), as a table.

Each seed is one whole run of the pipeline (its own teacher demonstrations, initialisation and ICL
demonstrations on the same queries), so the seeds' scores are independent draws of a method's score.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

# two-sided 95% quantiles t_{0.975, df} of Student's t for df = 1..30; past 30 the normal's 1.96 is within 2%
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)  # fmt: skip


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom."""
    if df < 1:
        raise ValueError(f"a confidence interval needs at least 2 values (df={df})")
    return _T975[df - 1] if df <= len(_T975) else 1.96


@dataclass(frozen=True)
class Interval:
    """The mean of `values` and the half-width of its 95% interval (0 for a single value: no spread known)."""

    values: tuple[float, ...]
    mean: float
    half_width: float

    @classmethod
    def of(cls, values) -> Interval:
        values = tuple(float(v) for v in values)
        mean = statistics.fmean(values)
        if len(values) < 2:
            return cls(values, mean, 0.0)
        return cls(values, mean, t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values)))

    def to_dict(self) -> dict:
        return {
            "mean": round(self.mean, 4),
            "ci95": round(self.half_width, 4),
            "low": round(self.mean - self.half_width, 4),
            "high": round(self.mean + self.half_width, 4),
            "seeds": [round(v, 4) for v in self.values],
        }


def summarize(reports: dict[int, dict]) -> dict:
    """Evaluation reports by seed (what `mimic evaluate` returns: score and latency per method) as one summary:
    per method the score's mean and 95% interval, the seeds' scores, its parameters and ms per sample (mean over
    seeds), in the reports' order.
    Every report must hold the same methods and metric."""
    seeds = sorted(reports)
    first = reports[seeds[0]]
    methods = first["latency"].get("methods", list(first["score"]))
    for seed in seeds:
        if set(reports[seed]["score"]) != set(methods) or reports[seed]["metric"] != first["metric"]:
            raise ValueError(
                f"seed {seed} scored {sorted(reports[seed]['score'])} ({reports[seed]['metric']}); seed "
                f"{seeds[0]} scored {sorted(methods)} ({first['metric']})"
            )
    rows = {}
    for method in methods:
        latency = [reports[s]["latency"][method]["ms_per_sample"] for s in seeds]
        rows[method] = {
            **Interval.of(reports[s]["score"][method] for s in seeds).to_dict(),
            "parameters": first["latency"][method].get("parameters", 0),
            "ms_per_sample": round(statistics.fmean(latency), 3),
        }
    return {
        "metric": first["metric"],
        "seeds": seeds,
        "about": first.get("about", ""),
        # the two short columns `dvc exp show` shows per method; the rest of each row under "detail"
        "mean": {method: row["mean"] for method, row in rows.items()},
        "ci95": {method: row["ci95"] for method, row in rows.items()},
        "detail": rows,
    }


def summary_table(summary: dict) -> str:
    """A Markdown table: one row per method, mean and 95% interval over the seeds."""
    n = len(summary["seeds"])
    lines = [
        f"| method | {summary['metric']} (mean of {n} seeds) | 95% interval | per seed | parameters | ms / query |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for method, row in summary["detail"].items():
        seeds = ", ".join(f"{v:.1f}" for v in row["seeds"])
        interval = f"{row['low']:.1f} - {row['high']:.1f}" if n > 1 else "n/a (one seed)"
        lines.append(
            f"| {method} | {row['mean']:.1f} | {interval} | {seeds} | "
            f"{row['parameters']:,} | {row['ms_per_sample']:.2f} |"
        )
    return "\n".join(lines)
