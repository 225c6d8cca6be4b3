"""benchmarks/gpu.py's dry run (tiny sizes, CPU) as a subprocess: every section runs and writes finite figures;
a bad argument exits non-zero naming the problem."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def numbers(value):
    """Every number (not bool) in a JSON value."""
    if isinstance(value, dict):
        return [n for v in value.values() for n in numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in numbers(v)]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    return []


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "gpu.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def test_every_section_writes_finite_figures(dry_run):
    report, stdout = dry_run
    assert report["about"]["dry_run"] is True
    for name in "abcde":
        section = report[name]
        assert "error" not in section, section.get("error")
        assert section["measures"] and section["section_seconds"] >= 0
        figures = numbers({k: v for k, v in section.items() if k != "section_seconds"})
        assert figures and all(math.isfinite(x) for x in figures), name
        assert f"\n{name} " in "\n" + stdout  # its table lines


def test_exactness_section_compares_both_paths_in_every_dtype(dry_run):
    a = dry_run[0]["a"]
    for dtype, bound in (("torch.float32", 1e-4), ("torch.bfloat16", 0.2), ("torch.float16", 0.05)):
        for case in ("prefill", "decode"):
            for path in ("fused", "materialized"):
                errors = a[dtype][case][path]
                assert set(errors) == {"out", "lse", "dq", "dk", "dv"}
                assert all(0 <= e <= bound for e in errors.values()), (dtype, case, path, errors)


def test_timed_sections_report_positive_times_and_ratios(dry_run):
    report = dry_run[0]
    for row in report["b"]["rows"]:
        assert all(row[m]["seconds"] > 0 for m in ("plain", "fused", "materialized"))
    assert report["c"]["ratio"] > 0 and all(v > 0 for v in report["c"]["ms_per_token"].values())
    assert report["d"]["ratio_best"] > 0 and report["d"]["bytes_on_disk"] > 0
    assert all(v > 0 for v in report["e"]["seconds_per_epoch"].values())


@pytest.mark.parametrize(
    "args, message", [(["--only", "a,z"], "unknown sections"), (["--repeats", "3"], "unrecognized")]
)
def test_a_bad_argument_exits_non_zero(tmp_path, args, message):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path / "x.json"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and message in done.stderr
    assert not (tmp_path / "x.json").exists()
