"""The DVC pipeline: `dvc repro` runs extract -> train -> evaluate; changing a train parameter reuses the cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import ROOT, SMALL

from pipeline.config import apply_overrides


def dvc(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, (
        f"dvc {' '.join(args)} failed: {result.stdout[-1500:]} {result.stderr[-1500:]}"
    )
    return result


def write_params(path: Path, *extra: str) -> None:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    path.write_text(yaml.safe_dump(apply_overrides(raw, [*SMALL, "train.epochs=1", *extra], "params.yaml")))


def test_repro_twice_changing_only_train_reuses_the_extract_output(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", project / "dvc.yaml")
    write_params(project / "params.yaml")
    dvc("init", "--no-scm", "-q", cwd=project)

    first = dvc("repro", cwd=project)
    assert "Running stage 'extract'" in first.stdout and "Running stage 'evaluate'" in first.stdout
    store = project / "cache" / "teacher.zarr"
    stamp = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}

    write_params(project / "params.yaml", "train.lr=0.01")
    second = dvc("repro", cwd=project)
    assert "Running stage 'extract'" not in second.stdout
    assert "Running stage 'train'" in second.stdout and "Running stage 'evaluate'" in second.stdout
    assert stamp == {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}

    shown = json.loads(dvc("metrics", "show", "--json", cwd=project).stdout)
    metrics = next(iter(shown.values()))["data"]["metrics/evaluate.json"]["data"]
    assert {"zero_shot", "icl", "mimic"} <= set(metrics)
    assert all(0 <= metrics[m]["score"] <= 100 for m in ("zero_shot", "icl", "mimic"))
