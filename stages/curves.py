"""`mimic curves`: accuracy against shots and against training queries, each point over the seeds.

Recipe, for every seed (its teacher demonstrations, initialisation and ICL demonstrations, as in dvc.yaml):
- shots: ICL at each k (zero-shot at k = 0) and MimIC trained from a k-shot teacher, on the same queries;
- training queries: MimIC trained on the first n training queries (teacher at extract.k), ICL at evaluate.k a line.
Every teacher cache and run lives under `--work` and is reused when the command runs again (extract resumes a
store and skips a complete one; train rewrites a finished run's outputs), so a longer list only adds points.
Writes `--out`/accuracy_vs_shots.png, accuracy_vs_queries.png and curves.json (every point's seeds and interval).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.config import load_params
from pipeline.errors import MimicError
from pipeline.outputs import check_writable, write_text_atomic
from pipeline.plots import curve
from pipeline.summary import Interval
from stages.evaluate import evaluate
from stages.extract import extract
from stages.train import train

log = logging.getLogger(__name__)


def curves(
    params_path: Path,
    out: Path,
    work: Path,
    shots: list[int],
    queries: list[int],
    overrides: list[str] = (),
) -> dict:
    """Run every point of both curves for each seed of params.yaml `seeds`; returns what curves.json holds."""
    params = load_params(params_path, overrides)
    if not shots or min(shots) < 0 or not queries or min(queries) < 1:
        raise MimicError(f"--shots {shots} / --queries {queries}: give shots >= 0 and training queries >= 1")
    pool = params.data.n_support + max(queries) + params.data.n_val
    if params.data.train.get("n") is not None and params.data.train["n"] < pool:
        raise MimicError(
            f"--queries up to {max(queries)}: data.train.n={params.data.train['n']} holds fewer than the "
            f"{pool} items needed (n_support + queries + n_val); raise it with -s data.train.n={pool}"
        )
    for name in ("accuracy_vs_shots.png", "accuracy_vs_queries.png", "curves.json"):
        check_writable(out / name, "output file")
    ev_k = params.evaluate.k
    icl_ks = sorted(set(shots) | {ev_k})
    points = {"icl": {k: [] for k in icl_ks}, "mimic_shots": {k: [] for k in shots if k > 0}}
    points["mimic_queries"] = {n: [] for n in queries}
    for seed in params.seeds:
        seeded = [*overrides, f"extract.seed={seed}", f"train.seed={seed}", f"evaluate.seed={seed}"]
        seeded += ["train.method=mimic", "evaluate.repeats=1"]  # one timed pass: the curves need scores only
        here = work / f"seed{seed}"
        for k in icl_ks:  # the prompt methods, k = 0 being zero-shot
            method = "zero_shot" if k == 0 else "icl"
            settings = [*seeded, f"evaluate.k={max(k, 1)}", f"evaluate.methods=[{method}]"]
            points["icl"][k].append(score_of(params_path, here / f"icl_k{k}", [], settings)[method])
        for k in points["mimic_shots"]:  # MimIC from a k-shot teacher
            run = fit(params_path, here / f"teacher_k{k}", [*seeded, f"extract.k={k}"])
            settings = [*seeded, f"extract.k={k}", "evaluate.methods=[]"]
            points["mimic_shots"][k].append(score_of(params_path, run.parent, [run], settings)[run.name])
        for n in queries:  # MimIC from n training queries (the first n of one draw)
            run = fit(params_path, here / f"queries_{n}", [*seeded, f"data.n_train={n}"])
            settings = [*seeded, f"data.n_train={n}", "evaluate.methods=[]"]
            points["mimic_queries"][n].append(score_of(params_path, run.parent, [run], settings)[run.name])
    result = {
        "metric": "accuracy",
        "seeds": params.seeds,
        "extract_k": params.extract.k,
        "evaluate_k": ev_k,
        "n_train": params.data.n_train,
        "points": {
            series: {str(x): Interval.of(values).to_dict() for x, values in by_x.items()}
            for series, by_x in points.items()
        },
    }
    curve(
        result,
        [("icl", "ICL (k demonstrations)"), ("mimic_shots", "MimIC (k-shot teacher)")],
        "demonstrations k",
        out / "accuracy_vs_shots.png",
        keys=[str(k) for k in shots],
    )
    curve(
        result,
        [("mimic_queries", f"MimIC ({params.extract.k}-shot teacher)")],
        "training queries",
        out / "accuracy_vs_queries.png",
        line=("icl", str(ev_k), f"{ev_k}-shot ICL"),
    )
    write_text_atomic(
        out / "curves.json", json.dumps(result, indent=2, sort_keys=True, allow_nan=False) + "\n"
    )
    return result


def fit(params_path: Path, folder: Path, settings: list[str]) -> Path:
    """Extract the teacher into `folder` (resumed or skipped when there) and train MimIC from it; the run."""
    cache, run = folder / "teacher.zarr", folder / "mimic"
    extract(params_path, cache, settings, replace=True)
    train(params_path, cache, run, settings, replace=True)
    return run


def score_of(params_path: Path, folder: Path, runs: list[Path], settings: list[str]) -> dict[str, float]:
    """Evaluate into `folder` and return the score per method label."""
    report = evaluate(
        params_path,
        runs,
        folder / "evaluate.json",
        folder / "predictions.jsonl",
        settings,
    )
    return report["score"]
