"""`mimic evaluate`: the three methods side by side, scored by the shared metric code, with clear errors."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, SMALL, build_tiny, cli, overrides

from pipeline.families import Adapter
from pipeline.metrics import exact_match
from pipeline.shift import MimicShift, spec_for
from pipeline.shift_io import save_shift
from stages.extract import extract
from stages.train import train

PARAMS = ROOT / "params.yaml"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    extract(PARAMS, tmp / "teacher.zarr", SMALL)
    train(PARAMS, tmp / "teacher.zarr", tmp / "run", SMALL)
    return tmp


def test_three_methods_scored_with_the_shared_metric(run):
    metrics, predictions = run / "metrics.json", run / "predictions.jsonl"
    result = cli(
        "evaluate",
        "--shift",
        run / "run" / "shift",
        "--metrics",
        metrics,
        "--predictions",
        predictions,
        *overrides(),
        check=True,
    )
    report = json.loads(metrics.read_text())
    for method in ("zero_shot", "icl", "mimic"):
        r = report[method]
        assert r["samples"] == 24 and 0 <= r["score"] <= 100 and r["latency_ms_per_sample"] > 0
        assert method in result.stdout
    assert report["icl"]["prompt_tokens_per_sample"] > report["zero_shot"]["prompt_tokens_per_sample"]
    assert report["mimic"]["prompt_tokens_per_sample"] == report["zero_shot"]["prompt_tokens_per_sample"]
    assert report["mimic_speedup_over_icl"] == pytest.approx(
        report["icl"]["latency_ms_per_sample"] / report["mimic"]["latency_ms_per_sample"], rel=1e-2
    )
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(rows) == 24
    for method in ("zero_shot", "icl", "mimic"):
        rescored = 100 * sum(exact_match(r[method]["prediction"], r["answers"]) for r in rows) / len(rows)
        assert rescored == pytest.approx(report[method]["score"], abs=1e-3)


def test_missing_run_directory_is_one_line(tmp_path):
    result = cli("evaluate", "--shift", tmp_path / "nowhere", "--metrics", tmp_path / "m.json", *overrides())
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("mimic: error: run directory not found")
    assert not (tmp_path / "m.json").exists()


def test_shift_of_another_model_is_refused(tmp_path):
    other = build_tiny("idefics2")
    save_shift(MimicShift(spec_for(Adapter(other))), tmp_path / "shift", Adapter(other))
    result = cli("evaluate", "--shift", tmp_path / "shift", "--metrics", tmp_path / "m.json", *overrides())
    assert result.returncode == 2 and "trained for idefics2" in result.stderr.strip().splitlines()[-1]
