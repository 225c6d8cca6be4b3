"""`mimic evaluate`: the three methods side by side, scored by the shared metric code, with clear errors."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, SMALL, build_tiny, cli, overrides

from pipeline.families import ModelView
from pipeline.methods.io import save_method
from pipeline.methods.mimic import MimicShift, spec_for
from pipeline.metrics import exact_match
from stages.extract import extract
from stages.train import train

PARAMS = ROOT / "params.yaml"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    extract(PARAMS, tmp / "teacher.zarr", SMALL)
    train(PARAMS, tmp / "teacher.zarr", tmp / "mimic", SMALL)
    return tmp


def test_three_methods_scored_with_the_shared_metric(run):
    metrics, predictions, results = run / "metrics.json", run / "predictions.jsonl", run / "results"
    result = cli(
        "evaluate",
        "--run-dir",
        run / "mimic",
        "--metrics",
        metrics,
        "--predictions",
        predictions,
        "--results",
        results,
        *overrides(),
        check=True,
    )
    report = json.loads(metrics.read_text())
    latency = json.loads((run / "metrics_latency.json").read_text())
    assert report["metric"] == "exact_match" and set(report) == {
        "about",
        "metric",
        "score",
    }  # few DVC columns
    about = report["about"]
    assert about.startswith("exact_match of embedded on kind=embedded, task=color") and "queries=24" in about
    assert about.endswith(f"runs {run / 'mimic'}")
    assert (
        latency["model"] == "embedded" and latency["data"]["queries"] == 24 and latency["data"]["seed"] == 0
    )
    for method in ("zero_shot", "icl", "mimic"):
        assert 0 <= report["score"][method] <= 100
        r = latency[method]
        assert 0 < r["ms_per_sample_p25"] <= r["ms_per_sample_p75"] and r["ms_per_sample"] > 0
    assert (
        latency["settings"]["repeats"] == 2 and latency["settings"]["timed_chunks"] == 2
    )  # 24 queries, batch 24
    assert latency["icl"]["prompt_tokens_per_sample"] > latency["zero_shot"]["prompt_tokens_per_sample"]
    assert latency["mimic"]["prompt_tokens_per_sample"] == latency["zero_shot"]["prompt_tokens_per_sample"]
    assert latency["mimic_speedup_over_icl"] == pytest.approx(
        latency["icl"]["ms_per_sample"] / latency["mimic"]["ms_per_sample"], rel=1e-2
    )
    # the last lines printed are the per-method table
    table = result.stdout.strip().splitlines()[-5:]
    assert table[0].split()[:3] == ["method", "exact_match", "parameters"]
    assert [line.split()[0] for line in table[1:]] == ["zero_shot", "icl", "rices", "mimic"]
    assert [line.split()[2] for line in table[1:]] == ["0", "0", "0", "784"]  # trainable parameters
    assert latency["rices"]["prompt_tokens_per_sample"] > latency["zero_shot"]["prompt_tokens_per_sample"]
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(rows) == 24
    for method in ("zero_shot", "icl", "mimic"):
        rescored = 100 * sum(exact_match(r[method]["prediction"], r["answers"]) for r in rows) / len(rows)
        assert rescored == pytest.approx(report["score"][method], abs=1e-3)
        official = json.loads((results / f"{method}.json").read_text())
        assert [o["answer"] for o in official] == [r[method]["prediction"] for r in rows]
        assert [o["id"] for o in official] == [r["id"] for r in rows]


def test_interleaved_generation_equals_one_method_at_a_time(run, tmp_path):
    """Chunks, rotation and the warm-up change no answer: each method alone gives the same predictions."""
    both = json.loads((run / "predictions.jsonl").read_text().splitlines()[0])
    for method in ("icl", "mimic"):
        predictions = tmp_path / f"{method}.jsonl"
        alone = ["--run-dir", run / "mimic"] if method == "mimic" else []
        cli(
            "evaluate", *alone, "--metrics", tmp_path / f"{method}.json", "--predictions", predictions,
            *overrides(f"evaluate.methods=[{method}]" if method == "icl" else "evaluate.methods=[]",
                       "evaluate.batch_size=5"),
            check=True,
        )  # fmt: skip
        alone = json.loads(predictions.read_text().splitlines()[0])
        assert alone[method] == both[method]


def test_shift_of_other_weights_or_prompt_is_refused_unless_allowed(run, tmp_path):
    from pipeline.embedded.model import build_model, build_processor

    other = tmp_path / "sibling"  # same architecture, other weights: an instruct sibling
    build_model(seed=123).save_pretrained(other)
    build_processor().save_pretrained(other)
    shift = run / "mimic"
    args = [
        "evaluate",
        "--run-dir",
        shift,
        "--metrics",
        tmp_path / "m.json",
        "--predictions",
        tmp_path / "p.jsonl",
    ]
    result = cli(*args, *overrides(f"model.name={other}"))
    line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "trained on model" in line and "this model's weights are" in line
    assert not (tmp_path / "m.json").exists()
    result = cli(*args, *overrides("prompt='{image}Q: {question} A: {answer}\n'"))
    line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "trained with the prompt" in line and "Q: {question}" in line
    cli(*args, "--allow-other-base", *overrides(f"model.name={other}", "evaluate.methods=[]"), check=True)
    assert (tmp_path / "m.json").exists()


def test_missing_run_directory_is_one_line(tmp_path):
    result = cli(
        "evaluate", "--run-dir", tmp_path / "nowhere", "--metrics", tmp_path / "m.json", *overrides()
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("mimic: error: no trained method in")
    assert not (tmp_path / "m.json").exists()


def test_shift_of_another_model_is_refused(tmp_path):
    other = build_tiny("idefics2")
    save_method(MimicShift(spec_for(ModelView(other))), tmp_path / "method", ModelView(other))
    result = cli("evaluate", "--run-dir", tmp_path, "--metrics", tmp_path / "m.json", *overrides())
    assert result.returncode == 2 and "trained for idefics2" in result.stderr.strip().splitlines()[-1]


def test_latency_quartiles_stay_within_the_chunks_timings():
    # two chunks of 2 ms and 30 ms per sample: the quartiles of the chunks, not an extrapolation below 0
    from types import SimpleNamespace

    from stages.evaluate import latency_report

    ev = SimpleNamespace(repeats=1, batch_size=4, num_beams=1)
    report = latency_report({"icl": [(0.008, 4), (0.06, 2)]}, {"icl": [10] * 6}, 6, ev)["icl"]
    assert 2.0 <= report["ms_per_sample_p25"] <= report["ms_per_sample_p75"] <= 30.0
    assert report["ms_per_sample_p25"] == 9.0 and report["ms_per_sample_p75"] == 23.0  # numpy's linear method
    assert report["ms_per_sample"] == round(1000 * 0.068 / 6, 3)


def test_every_output_is_checked_before_any_generation(tmp_path):
    from pipeline.errors import MimicError
    from stages.evaluate import evaluate

    same = tmp_path / "out.json"
    with pytest.raises(MimicError, match=r"out.json would be written twice"):
        evaluate(ROOT / "params.yaml", [], same, same, SMALL)
    (tmp_path / "m_scores.png").mkdir()  # the chart beside the metrics
    with pytest.raises(MimicError, match=r"output file .*m_scores.png exists and is a folder"):
        evaluate(ROOT / "params.yaml", [], tmp_path / "m.json", tmp_path / "p.jsonl", SMALL)
    (tmp_path / "results" / "icl.json").mkdir(parents=True)  # not only the first method's results file
    with pytest.raises(MimicError, match=r"output file .*icl.json exists and is a folder"):
        evaluate(
            ROOT / "params.yaml", [], tmp_path / "n.json", tmp_path / "q.jsonl", SMALL, tmp_path / "results"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m_scores.png", "results"]  # nothing written
