"""`mimic summarize`: every seed's evaluation as one table, each method's mean and 95% interval over the seeds.

Recipe: params (the seeds) -> each seed's metrics and latency JSON, `<root>/seed<s>/evaluate.json` -> intervals
-> summary JSON (DVC metrics), Markdown table, bar chart with the intervals.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import load_params
from pipeline.errors import MimicError
from pipeline.outputs import check_writable, write_text_atomic
from pipeline.plots import interval_scores
from pipeline.summary import summarize as summarize_reports
from pipeline.summary import summary_table
from stages.evaluate import read_report


def seed_metrics(root: Path, seed: int) -> Path:
    """Where seed `seed`'s evaluation lies (dvc.yaml's evaluate stage writes it there)."""
    return root / f"seed{seed}" / "evaluate.json"


def summarize(params_path: Path, root: Path, out: Path, overrides: list[str] = ()) -> dict:
    """Read the evaluation of every seed of params.yaml `seeds` under `root` and write the summary JSON `out`,
    its Markdown table (`out` with suffix .md) and chart (`out` with suffix .png); returns the summary."""
    seeds = load_params(params_path, overrides).seeds
    for path in (out, out.with_suffix(".md"), out.with_suffix(".png")):
        check_writable(path, "output file")
    missing = [str(seed_metrics(root, s)) for s in seeds if not seed_metrics(root, s).is_file()]
    if missing:
        raise MimicError(f"no evaluation for {', '.join(missing)}: run `mimic evaluate` for each seed first")
    try:
        summary = summarize_reports({s: read_report(seed_metrics(root, s)) for s in seeds})
    except ValueError as err:  # the seeds' tables differ
        raise MimicError(f"the evaluations under {root} do not match: {err}") from None
    table = summary_table(summary)
    interval_scores(summary, out.with_suffix(".png"))
    write_text_atomic(out.with_suffix(".md"), table + "\n")
    write_text_atomic(out, json.dumps(summary, indent=2, sort_keys=True, allow_nan=False) + "\n")
    return {**summary, "table": table}
