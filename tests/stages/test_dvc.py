"""The DVC pipeline as a researcher uses it: `dvc repro` reuses what did not change (by parameters AND by the
source files each stage imports), a killed repro resumes training, experiments keep every metric and plot."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, SMALL

from pipeline.config import apply_overrides
from pipeline.sources import STAGES, stage_sources

GIT = ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci"]


def environment() -> dict:
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "COLUMNS": "400",
    }


def dvc(*args, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=cwd,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert not check or result.returncode == 0, (
        f"dvc {' '.join(args)} failed: {result.stdout[-1500:]} {result.stderr[-1500:]}"
    )
    return result


def write_params(path: Path, *extra: str) -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    # two of the trained methods and one seed (two where a test says so): one train stage per method and seed,
    # every method of a seed from its one cache
    settings = [*SMALL, "train.epochs=1", "trained=[mimic, live]", "seeds=[0]", *extra]
    path.write_text(yaml.safe_dump(apply_overrides(raw, settings, "params.yaml")))


def project(tmp_path: Path, *extra: str, git: bool = False) -> Path:
    """A copy of the project (code, dvc.yaml, small params) with DVC initialised, under git if `git`."""
    root = tmp_path / "project"
    root.mkdir()
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, root / name)
    write_params(root / "params.yaml", *extra)
    if git:
        subprocess.run(["git", "init", "-q"], cwd=root, check=True)
        dvc("init", "-q", cwd=root)
        commit(root, "project")
    else:
        dvc("init", "--no-scm", "-q", cwd=root)
    return root


def commit(root: Path, message: str) -> None:
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run([*GIT, "commit", "-qm", message], cwd=root, check=True)


def changed_stages(root: Path) -> set[str]:
    return set(json.loads(dvc("status", "--json", cwd=root).stdout))


def test_stage_dependencies_are_exactly_the_files_each_recipe_imports():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in ("extract", "evaluate"):
        stages[name] = stages[name]["do"]  # foreach: one stage per seed
    for stage, module in STAGES.items():
        listed = {d for d in stages[stage]["deps"] if d.endswith(".py")}
        assert listed == set(stage_sources(module)), f"{stage}: run `python -m pipeline.sources dvc.yaml`"
        # independent of the import parser: what importing the recipe actually loads is among them
        code = (
            f"import sys, {module}; from pathlib import Path; root = Path.cwd()\n"
            "for m in list(sys.modules.values()):\n"
            "    f = getattr(m, '__file__', None)\n"
            "    f = f and Path(f).resolve()\n"
            "    if f and any(f.is_relative_to(root / p) for p in ('pipeline', 'stages')):\n"
            "        print(f.relative_to(root))"
        )
        loaded = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
        )
        assert set(loaded.stdout.split()) <= listed, stage
    assert "pipeline/metrics/vqa.py" in stages["evaluate"]["deps"]
    assert not any(
        "metrics" in d or "evaluation" in d for d in stages["extract"]["deps"] + stages["train"]["deps"]
    )
    assert not any(d in stages["extract"]["deps"] for d in ("pipeline/training.py", "stages/train.py"))


def test_repro_reuses_what_did_not_change_by_parameters_and_by_code(tmp_path):
    root = project(tmp_path, "seeds=[0, 1]")
    first = dvc("repro", cwd=root)
    ran = set(re.findall(r"Running stage '([^']+)'", first.stdout))
    seeded = lambda *names: {f"{n}@{s}" for n in names for s in (0, 1)}  # noqa: E731
    trains = {f"train@{m}-{s}" for m in ("mimic", "live") for s in (0, 1)}
    assert ran == seeded("extract", "evaluate") | trains | {"summarize"}
    # the last thing printed is the summary: each method's mean and interval over the two seeds
    assert re.search(r"^\| mimic \| [\d.]+ \| [\d.]+ - [\d.]+ \| [\d.]+, [\d.]+ \|", first.stdout, re.M)
    stores = [root / "cache" / f"seed{s}" / "teacher.zarr" for s in (0, 1)]
    stamp = {p: p.stat().st_mtime_ns for store in stores for p in store.rglob("*") if p.is_file()}
    assert stamp and all(store.is_dir() for store in stores)

    write_params(root / "params.yaml", "seeds=[0, 1]", "methods.mimic.lr=0.01")
    second = dvc("repro", cwd=root)
    ran = set(re.findall(r"Running stage '([^']+)'", second.stdout))
    # one method's parameters: that method's stages (each seed) and what reads them, no teacher
    assert ran == {"train@mimic-0", "train@mimic-1", "summarize"} | seeded("evaluate")
    assert stamp == {p: p.stat().st_mtime_ns for store in stores for p in store.rglob("*") if p.is_file()}

    evaluate, train = seeded("evaluate"), trains
    for edited, expected in (
        ("pipeline/metrics/vqa.py", evaluate | {"summarize"}),  # evaluation-only code
        ("pipeline/evaluation.py", evaluate | {"summarize"}),
        ("pipeline/summary.py", {"summarize"}),
        # training code: the teacher cache stays valid (evaluate imports the methods, whose fitting uses it)
        ("pipeline/training.py", train | evaluate | {"summarize"}),
        ("pipeline/methods/hificl.py", train | evaluate | {"summarize"}),
        ("pipeline/prompts.py", seeded("extract") | train | evaluate | {"summarize"}),
    ):
        path = root / edited
        original = path.read_text()
        path.write_text(original + "\n# a comment\n")
        assert changed_stages(root) == expected, edited
        path.write_text(original)
    assert changed_stages(root) == set()

    shown = json.loads(dvc("metrics", "show", "--json", cwd=root).stdout)
    tracked = next(iter(shown.values()))["data"]["metrics/summary.json"]["data"]
    methods = ("zero_shot", "icl", "rices", "mimic", "live")
    summary = json.loads((root / "metrics" / "summary.json").read_text())
    assert tracked["mean"] == summary["mean"]  # DVC shows the numbers
    assert set(summary["mean"]) == set(methods)
    assert summary["seeds"] == [0, 1]
    for seed in (0, 1):  # the summary holds each seed's own evaluation
        evaluation = root / "metrics" / "seeds" / f"seed{seed}" / "evaluate.json"
        scores = json.loads(evaluation.read_text())["score"]
        assert all(summary["detail"][m]["seeds"][seed] == scores[m] for m in methods)
    assert all(0 <= summary["detail"][m]["low"] <= summary["mean"][m] <= 100 for m in methods)


def test_a_killed_repro_resumes_training_and_a_rerun_keeps_its_figures(tmp_path):
    extra = ("train.epochs=4", "train.batch_size=4")
    root = project(tmp_path, *extra)
    dvc("repro", "extract", cwd=root)
    checkpoint = root / "runs" / "seed0" / "mimic" / "checkpoint.pt"
    command = [sys.executable, "-m", "dvc", "repro"]
    proc = subprocess.Popen(command, cwd=root, env=environment(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = torch.load(checkpoint, weights_only=True)["epoch"]
    assert 1 <= done < 4, f"the kill landed after epoch {done}"
    resumed = dvc("repro", cwd=root)
    assert f"resuming runs/seed0/mimic after epoch {done} of 4" in resumed.stderr + resumed.stdout

    # the same run in one go, outside DVC
    cli_params = tmp_path / "params.yaml"
    write_params(cli_params, *extra)
    subprocess.run(
        [sys.executable, "-m", "stages.cli", "train", "--params", cli_params, "--cache",
         root / "cache" / "seed0" / "teacher.zarr", "--run-dir", tmp_path / "straight", "-s", "extract.seed=0",
         "-s", "train.seed=0"], cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    from pipeline.methods.io import load_method

    a, b = (
        load_method(root / "runs" / "seed0" / "mimic" / "method"),
        load_method(tmp_path / "straight" / "method"),
    )
    assert all(torch.allclose(p, getattr(b, n), atol=1e-7) for n, p in a.named_parameters())

    info = (root / "runs" / "seed0" / "mimic" / "train_info.json").read_text()
    dvc(
        "repro", "--force", "train@mimic-0", cwd=root
    )  # a finished run again: outputs rewritten, figures kept
    assert (root / "runs" / "seed0" / "mimic" / "train_info.json").read_text() == info


def test_experiments_keep_their_metrics_and_plots(tmp_path):
    root = project(tmp_path, git=True)
    dvc("repro", cwd=root)
    commit(root, "baseline")
    dvc("exp", "run", "-S", "methods.mimic.lr=0.01", "-n", "lower-lr", cwd=root)
    shown = json.loads(dvc("exp", "show", "--json", cwd=root).stdout)
    runs = [shown[0]] + [e for entry in shown for e in (entry.get("experiments") or [])]
    names = []
    for run in runs:
        for revision in [run] + [r for r in (run.get("revs") or [])]:
            data = revision.get("data") or {}
            if not data:
                continue
            names.append(revision.get("name") or data.get("rev"))
            metrics = data["metrics"]
            assert metrics["runs/seed0/mimic/train_summary.json"]["data"]["align"] > 0, revision
            scores = set(metrics["metrics/summary.json"]["data"]["mean"])
            assert scores == {"zero_shot", "icl", "rices", "mimic", "live"}
    assert "lower-lr" in names

    # the README's narrow view: the changed parameter and every method's score, within 120 columns
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"^(dvc exp show --only-changed[^\n#]*?)\s*(#|$)", readme, re.M).group(1).split()
    table = dvc(*[c.strip("'") for c in command[1:]], cwd=root).stdout
    widest = max(len(line.rstrip()) for line in table.splitlines())
    assert widest <= 120, table
    assert "methods.mimic.lr" in table and "mean.mimic" in table and "mean.zero_shot" in table

    assert dvc("metrics", "diff", "HEAD", cwd=root).returncode == 0
    plots = json.loads(dvc("plots", "diff", "HEAD", "lower-lr", "--json", cwd=root).stdout)["data"]
    images = plots["runs/seed0/mimic/train_curves.png"]
    assert {tuple(i["revisions"]) for i in images} == {("HEAD",), ("lower-lr",)}
    assert all(i["type"] == "image" and Path(i["url"]).read_bytes()[:4] == b"\x89PNG" for i in images)
    assert plots["metrics/summary.png"]


@pytest.mark.parametrize("name", ["runs/seed0/mimic/train_summary.json", "metrics/summary.json"])
def test_tracked_metrics_are_not_git_ignored(name):
    ignored = subprocess.run(["git", "check-ignore", "-q", name], cwd=ROOT)
    assert ignored.returncode == 1, f"{name} is git-ignored: experiments would lose it"
