"""`mimic train`: only the shifts learn, the cache and the online teacher give the same shift, runs resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, SMALL, cli, overrides

from pipeline.config import load_params
from pipeline.methods.io import load_method
from pipeline.models import load_model
from stages.extract import extract
from stages.train import train

PARAMS = ROOT / "params.yaml"
TRAIN = [*SMALL, "train.epochs=6", "train.batch_size=4", "methods.mimic.lr=0.1"]


def kill_after_first_checkpoint(args: list[str], run_dir) -> None:
    """Run `mimic <args> --run-dir run_dir` and SIGKILL it as soon as its first checkpoint is written."""
    command = [sys.executable, "-m", "stages.cli", *args, "--run-dir", str(run_dir)]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run_dir / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "teacher.zarr"
    extract(PARAMS, out, SMALL)
    return out


def test_alignment_loss_halves_and_base_weights_stay(store, tmp_path):
    params = load_params(PARAMS, TRAIN)
    loaded = load_model(params.model.name)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    summary = train(PARAMS, store, tmp_path / "run", TRAIN, loaded=loaded)
    assert summary["last_align"] <= 0.6 * summary["first_align"]  # epoch means
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    rows = (tmp_path / "run" / "train_log.tsv").read_text().splitlines()
    assert (
        rows[0].split("\t") == ["step", "epoch", "loss", "ce", "align", "kl", "lr"]
        and len(rows) == 1 + summary["steps"]
    )


def test_cache_and_online_reference_give_the_same_shift(store, tmp_path):
    train(PARAMS, store, tmp_path / "cache", SMALL)
    train(PARAMS, None, tmp_path / "online", SMALL)
    a, b = load_method(tmp_path / "cache" / "method"), load_method(tmp_path / "online" / "method")
    for name, p in a.named_parameters():
        q = getattr(b, name)
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), name
    assert not torch.equal(a.v, load_method(tmp_path / "cache" / "method").v * 0)  # trained, not zero


def test_killed_run_resumes_to_the_same_shift(store, tmp_path):
    args = ["train", "--cache", str(store), *overrides("train.epochs=3")]
    full = tmp_path / "full"
    cli(*args, "--run-dir", full, check=True)
    resumed = tmp_path / "resumed"
    kill_after_first_checkpoint(args, resumed)
    assert not (resumed / "method").exists()
    assert torch.load(resumed / "checkpoint.pt", weights_only=True)["epoch"] < 3
    cli(*args, "--run-dir", resumed, check=True)
    a, b = load_method(full / "method"), load_method(resumed / "method")
    assert all(torch.allclose(p, getattr(b, n), atol=1e-7) for n, p in a.named_parameters())
    assert (full / "train_log.tsv").read_text() == (resumed / "train_log.tsv").read_text()


def test_checkpoint_of_other_parameters_is_refused(store, tmp_path):
    run = tmp_path / "run"
    cli("train", "--cache", store, "--run-dir", run, *overrides("train.epochs=1"), check=True)
    result = cli(
        "train", "--cache", store, "--run-dir", run, *overrides("train.epochs=1", "methods.mimic.lr=0.5")
    )
    assert (
        result.returncode == 2
        and "belongs to another run (its method differ)" in result.stderr.strip().splitlines()[-1]
    )


@pytest.mark.parametrize("name", ["lora", "mimic_lora"])
def test_killed_lora_run_resumes_to_the_same_adapter(store, tmp_path, name):
    """LoRA's tensors live inside the model while it trains: the checkpoint still carries them, and a resumed
    run ends where an uninterrupted one does (every tensor, the peft part included)."""
    args = [
        "train",
        "--cache",
        str(store),
        *overrides("train.epochs=3", "train.batch_size=4", f"train.method={name}"),
    ]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    cli(*args, "--run-dir", full, check=True)
    kill_after_first_checkpoint(args, resumed)
    assert torch.load(resumed / "checkpoint.pt", weights_only=True)["epoch"] < 3
    cli(*args, "--run-dir", resumed, check=True)
    a, b = load_method(full / "method"), load_method(resumed / "method")
    lora_a, lora_b = (
        (a if name == "lora" else a.lora).adapter.state(),
        (b if name == "lora" else b.lora).adapter.state(),
    )
    assert lora_a.keys() == lora_b.keys() and len(lora_a) > 0
    assert all(torch.allclose(lora_a[k], lora_b[k], atol=1e-6) for k in lora_a)
    assert any(k.endswith("lora_B.weight") and lora_a[k].abs().max() > 0 for k in lora_a)  # it trained
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a.tensors().values(), b.tensors().values()))
    assert (full / "train_log.tsv").read_text() == (resumed / "train_log.tsv").read_text()


def test_a_run_is_named_after_its_method_and_evaluate_refuses_one_under_another_methods_name(store, tmp_path):
    params = ["--params", ROOT / "params.yaml", *overrides("train.epochs=1", "train.method=live")]
    cli("train", "--cache", store, *params, cwd=tmp_path, check=True)  # no --run-dir: runs/live
    assert (tmp_path / "runs" / "live" / "method").is_dir() and not (tmp_path / "runs" / "mimic").exists()
    (tmp_path / "runs" / "live").rename(tmp_path / "runs" / "mimic")
    result = cli("evaluate", "--run-dir", "runs/mimic", *params, cwd=tmp_path)
    assert result.returncode == 2 and not (tmp_path / "metrics").exists()
    assert "holds a trained 'live' method, but its folder's name" in result.stderr.strip().splitlines()[-1]
    (tmp_path / "runs" / "mimic").rename(tmp_path / "runs" / "icl")  # a prompt method's name: refused too
    result = cli("evaluate", "--run-dir", "runs/icl", *params, cwd=tmp_path)
    assert "is named after the prompt method 'icl'" in result.stderr.strip().splitlines()[-1]
    (tmp_path / "runs" / "icl").rename(tmp_path / "runs" / "my_live")  # any other name labels the row
    from stages.evaluate import run_label

    assert run_label(tmp_path / "runs" / "my_live") == "my_live"
    assert run_label(tmp_path / "runs" / "my_live" / ".") == "my_live"  # `.` is the folder's own name


def test_an_unreadable_checkpoint_is_one_line_and_replace_discards_it(store, tmp_path):
    from pipeline.errors import MimicError
    from stages.train import train

    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_text("garbage")
    settings = [*SMALL, "train.epochs=1"]
    with pytest.raises(MimicError, match=r"checkpoint .* is unreadable .*pass --replace") as excinfo:
        train(ROOT / "params.yaml", store, run, settings)
    assert "\n" not in str(excinfo.value)
    summary = train(ROOT / "params.yaml", store, run, settings, replace=True)  # DVC passes --replace
    assert summary["steps"] > 0 and (run / "method").is_dir()


@pytest.mark.parametrize(
    "name, message", [("live", "--online serves MimIC-style"), ("tv", "set data.n_val > 0")]
)
def test_a_refused_training_leaves_no_run_directory(tmp_path, name, message):
    from pipeline.errors import MimicError
    from stages.train import train

    run, cache = tmp_path / "runs" / name, None if name == "live" else tmp_path / "t.zarr"  # live online
    with pytest.raises(MimicError, match=message):
        train(ROOT / "params.yaml", cache, run, [*SMALL, f"train.method={name}"])  # SMALL has n_val=0
    assert not (tmp_path / "runs").exists()
