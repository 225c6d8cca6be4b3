"""`mimic curves` at a reduced size: each point equals the pipeline run by hand for it, a rerun reuses every
teacher cache, and bad lists fail in one line before any work."""

from __future__ import annotations

import json

import pytest
from conftest import SMALL, cli

SETTINGS = [*SMALL, "seeds=[0]", "train.epochs=1"]


def settings(*extra: str) -> list[str]:
    return [part for item in [*SETTINGS, *extra] for part in ("-s", item)]


@pytest.fixture(scope="module")
def curves(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("curves")
    args = ["curves", "--out", tmp / "plots", "--work", tmp / "work", "--shots", "0,1", "--queries", "8,16"]
    first = cli(*args, *settings(), check=True, timeout=600)
    stores = sorted((tmp / "work").rglob("teacher.zarr"))
    stamp = {p: p.stat().st_mtime_ns for store in stores for p in store.rglob("*") if p.is_file()}
    again = cli(*args, *settings(), check=True, timeout=600)
    return tmp, first, again, stores, stamp


def test_curves_write_both_plots_and_every_point(curves):
    tmp, first, _, stores, _ = curves
    for name in ("accuracy_vs_shots.png", "accuracy_vs_queries.png"):
        assert (tmp / "plots" / name).read_bytes()[:4] == b"\x89PNG"
    result = json.loads((tmp / "plots" / "curves.json").read_text())
    points = result["points"]
    assert set(points["icl"]) == {"0", "1", "4"}  # the shots, and evaluate.k for the line
    assert set(points["mimic_shots"]) == {"1"} and set(points["mimic_queries"]) == {"8", "16"}
    assert all(len(p["seeds"]) == 1 and 0 <= p["mean"] <= 100 for s in points.values() for p in s.values())
    assert len(stores) == 3  # one teacher per k > 0 and per training-query count
    assert "mimic_queries: 8:" in first.stdout


def test_each_point_equals_the_stages_run_by_hand(curves, tmp_path):
    tmp, *_ = curves
    points = json.loads((tmp / "plots" / "curves.json").read_text())["points"]
    seeded = ("extract.seed=0", "train.seed=0", "evaluate.seed=0", "evaluate.repeats=1")
    icl = tmp_path / "icl.json"
    cli("evaluate", "--metrics", icl, "--predictions", tmp_path / "icl.jsonl",
        *settings(*seeded, "evaluate.k=1", "evaluate.methods=[icl]"), check=True)  # fmt: skip
    assert json.loads(icl.read_text())["score"]["icl"] == points["icl"]["1"]["mean"]

    queries = (*seeded, "data.n_train=16", "train.method=mimic")
    cli("extract", "--out", tmp_path / "teacher.zarr", *settings(*queries), check=True)
    cli(
        "train",
        "--cache",
        tmp_path / "teacher.zarr",
        "--run-dir",
        tmp_path / "mimic",
        *settings(*queries),
        check=True,
    )
    mimic = tmp_path / "mimic.json"
    cli("evaluate", "--run-dir", tmp_path / "mimic", "--metrics", mimic, "--predictions", tmp_path / "m.jsonl",
        *settings(*queries, "evaluate.methods=[]"), check=True)  # fmt: skip
    assert json.loads(mimic.read_text())["score"]["mimic"] == points["mimic_queries"]["16"]["mean"]


def test_a_rerun_reuses_every_teacher_cache_and_gives_the_same_points(curves):
    tmp, first, again, stores, stamp = curves
    assert stamp == {p: p.stat().st_mtime_ns for store in stores for p in store.rglob("*") if p.is_file()}
    assert first.stdout == again.stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--shots", "0,x"], "--shots '0,x': give whole numbers separated by commas"),
        (
            ["--queries", "8,500"],
            "--queries up to 500: data.train.n=64 holds fewer than the 540 items needed",
        ),
    ],
)
def test_bad_lists_fail_in_one_line_before_any_work(tmp_path, extra, message):
    result = cli("curves", "--out", tmp_path / "plots", "--work", tmp_path / "work", *extra, *settings())
    assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "work").exists() and not (tmp_path / "plots").exists()
