"""`torchrun --nproc_per_node 2 --no-python mimic evaluate` on CPU (gloo): queries sharded, predictions gathered in
order, metrics computed once, equal to one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from conftest import ROOT, cli
from real_checkpoints import save_tiny_checkpoint, write_vqa_fixture

from pipeline.methods.io import load_method, save_method
from pipeline.methods.mimic import MimicShift, spec_for
from pipeline.models import load_model

BIN = Path(sys.executable).parent


def test_two_process_evaluate_equals_one_process(tmp_path):
    checkpoint = save_tiny_checkpoint("llava", tmp_path / "model")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["name"] = str(checkpoint)
    train = write_vqa_fixture(tmp_path / "data", 18, "train2014")
    held_out = write_vqa_fixture(tmp_path / "data", 9, "val2014", seed=1)
    params["data"].update(train=train, eval=held_out, n_support=12, n_train=2, n_eval=9, n_val=0)
    params["evaluate"].update(k=2, batch_size=3, max_new_tokens=3, repeats=1)  # each rank's chunks as one's
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    loaded = load_model(str(checkpoint))
    shift = MimicShift(spec_for(loaded.view), torch.Generator().manual_seed(0))
    with torch.no_grad():
        shift.v.normal_(0, 1.0, generator=torch.Generator().manual_seed(1))  # a shift that changes answers
    save_method(shift, tmp_path / "mimic" / "method", loaded.view, prompt=params["prompt"])

    def evaluate(out: Path, *launcher: str) -> subprocess.CompletedProcess:
        args = ["evaluate", "--params", path, "--run-dir", tmp_path / "mimic", "--metrics", out / "m.json"]
        args += ["--predictions", out / "p.jsonl", "--results", out / "results"]
        if not launcher:
            return cli(*args, check=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        command = [*launcher, str(BIN / "mimic"), *map(str, args)]
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    evaluate(tmp_path / "one")
    launcher = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python"]
    two = evaluate(tmp_path / "two", *launcher)
    one_report = json.loads((tmp_path / "one" / "m.json").read_text())
    two_report = json.loads((tmp_path / "two" / "m.json").read_text())
    assert one_report == two_report  # every score, computed once on rank 0
    assert (tmp_path / "one" / "p.jsonl").read_text() == (tmp_path / "two" / "p.jsonl").read_text()
    for method in ("zero_shot", "icl", "mimic"):
        one = (tmp_path / "one" / "results" / f"{method}.json").read_text()
        assert one == (tmp_path / "two" / "results" / f"{method}.json").read_text()
    latency = json.loads((tmp_path / "two" / "m_latency.json").read_text())
    assert latency["processes"] == 2 and latency["icl"]["prompt_tokens_per_sample"] > 0
    assert two.stdout.count("method ") == 1  # one table, from rank 0
    ids = [json.loads(line)["id"] for line in (tmp_path / "two" / "p.jsonl").read_text().splitlines()]
    assert len(ids) == 9 and len(set(ids)) == 9


def test_two_process_training_equals_one_process(tmp_path):
    from conftest import overrides

    from pipeline.methods.io import load_method
    from stages.extract import extract

    small = [o for o in overrides("train.epochs=2", "train.batch_size=8", "train.grad_accum=2")[1::2]]
    store = tmp_path / "teacher.zarr"
    extract(ROOT / "params.yaml", store, small)
    args = ["train", "--cache", store, *[a for o in small for a in ("-s", o)]]
    cli(*args, "--run-dir", tmp_path / "one", check=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [
        str(BIN / "torchrun"),
        "--standalone",
        "--nproc_per_node",
        "2",
        "--no-python",
        str(BIN / "mimic"),
    ]
    command = [*launcher, *map(str, args), "--run-dir", str(tmp_path / "two")]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = load_method(tmp_path / "one" / "method"), load_method(tmp_path / "two" / "method")
    for name, p in one.named_parameters():
        assert (p - getattr(two, name)).abs().max() <= 1e-5, name
    assert not torch.equal(one.v, load_method(tmp_path / "one" / "method").v * 0)
    logs = [(tmp_path / run / "train_log.tsv").read_text().splitlines()[1:] for run in ("one", "two")]
    for a, b in zip(*logs):  # the logged losses are the whole batch's, summed over the ranks' shares
        assert all(
            abs(float(x) - float(y)) <= 1e-5 * max(1.0, abs(float(x))) for x, y in zip(a.split(), b.split())
        )
    assert result.stdout.count(" parameters, loss ") == 1  # rank 0 reports


def test_device_auto_is_one_process_over_the_devices(tmp_path):
    """`model.device: auto` loads through accelerate's device map (on this CPU-only machine: every layer on the
    CPU) and trains the same shift as `cpu`; under torchrun it is refused in one line (one rank per GPU is the
    other way)."""
    from conftest import SMALL, overrides

    from stages.extract import extract

    store = tmp_path / "teacher.zarr"
    extract(ROOT / "params.yaml", store, SMALL)
    loaded = load_model("embedded", device="auto")
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}
    for device in ("cpu", "auto"):
        cli("train", "--cache", store, "--run-dir", tmp_path / device,
            *overrides("train.epochs=1", f"model.device={device}"), check=True)  # fmt: skip
    a, b = load_method(tmp_path / "cpu" / "method"), load_method(tmp_path / "auto" / "method")
    assert all(torch.allclose(p, getattr(b, n), atol=1e-6) for n, p in a.named_parameters())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python", str(BIN / "mimic"),
               "train", "--cache", str(store), "--run-dir", str(tmp_path / "two"),
               *map(str, overrides("train.epochs=1", "model.device=auto"))]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert (
        result.returncode != 0
        and "model.device=auto spreads one model over the GPUs of ONE process" in result.stderr
    )
    assert not (tmp_path / "two" / "method").exists()


def test_a_killed_rank_stops_the_run_and_the_same_command_resumes_it(tmp_path):
    """SIGKILL one of two training ranks after a checkpoint: torchrun stops the other and exits non-zero, no
    trained method is written, and rerunning the command resumes to the weights of an uninterrupted run."""
    import signal
    import time

    from conftest import SMALL, overrides

    from stages.extract import extract

    store = tmp_path / "teacher.zarr"
    extract(ROOT / "params.yaml", store, SMALL)
    settings = overrides("train.epochs=4", "train.batch_size=4")
    cli("train", "--cache", store, "--run-dir", tmp_path / "one", *settings, check=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python", str(BIN / "mimic"),
               "train", "--cache", str(store), "--run-dir", str(tmp_path / "two"), *map(str, settings)]  # fmt: skip
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    checkpoint = tmp_path / "two" / "checkpoint.pt"
    deadline = time.time() + 240
    while not checkpoint.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert ranks, "no rank processes found under torchrun"
    os.kill(int(ranks[-1]), signal.SIGKILL)  # one rank dies; the launcher must stop the other
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode != 0
    done = torch.load(checkpoint, weights_only=True)["epoch"]
    assert 1 <= done < 4 and not (tmp_path / "two" / "method").exists(), stderr[-2000:]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"after epoch {done} of 4" in result.stderr
    one, two = load_method(tmp_path / "one" / "method"), load_method(tmp_path / "two" / "method")
    for name, p in one.named_parameters():
        assert (p - getattr(two, name)).abs().max() <= 1e-5, name


def _arrays(store: Path) -> dict:
    import zarr

    group = zarr.open_group(store, mode="r")
    return {name: group[name][:] for name in sorted(group.array_keys())}, dict(group.attrs)


EXTRACT = ["extract.chunk_tokens=16", "extract.batch_size=4", "extract.topk=5"]  # many shards, shared ones


def test_two_process_extract_writes_the_one_process_store(tmp_path):
    """Two ranks write disjoint parts of ONE store (the files their parts share written one rank after the
    other); the store equals a one-process store array for array, byte for byte."""
    from conftest import overrides

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["extract", *map(str, overrides(*EXTRACT))]
    one = subprocess.run([str(BIN / "mimic"), *args, "--out", str(tmp_path / "one.zarr")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python", str(BIN / "mimic"),
               *args, "--out", str(tmp_path / "two.zarr")]  # fmt: skip
    two = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    (a, attrs_a), (b, attrs_b) = _arrays(tmp_path / "one.zarr"), _arrays(tmp_path / "two.zarr")
    assert a.keys() == b.keys() and attrs_a == attrs_b and attrs_b["complete"] is True
    assert not [k for k in b if k.startswith("progress_")]
    for name in a:
        assert a[name].dtype == b[name].dtype and (a[name] == b[name]).all(), name
    from pipeline.cache.store import CacheReader

    reader = CacheReader.open(tmp_path / "two.zarr")  # every sample's CRC checks out
    assert len(reader.read_many(list(range(len(reader))))) == len(reader)


def test_a_rank_killed_mid_extract_then_a_rerun_completes_the_same_store(tmp_path):
    import signal
    import time

    from conftest import overrides

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    more = [
        *EXTRACT,
        "data.train={kind: embedded, task: color, split: support, n: 100, seed: 0}",
        "data.n_train=60",
    ]
    args = ["extract", *map(str, overrides(*more))]
    one = subprocess.run([str(BIN / "mimic"), *args, "--out", str(tmp_path / "one.zarr")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    out = tmp_path / "two.zarr"
    command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python", str(BIN / "mimic"),
               *args, "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marked = out / "progress_2_0" / "c" / "0"  # rank 0 has marked its first samples
    deadline = time.time() + 240
    while not marked.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert marked.exists() and ranks, "the kill came too late"
    os.kill(int(ranks[-1]), signal.SIGKILL)
    proc.wait(timeout=240)
    assert proc.returncode != 0
    import zarr

    assert (
        zarr.open_group(out, mode="r").attrs["complete"] is False
    )  # not complete while a rank did not finish
    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    import re

    redone = [int(n) for n in re.findall(r"extracting (\d+) of 60 samples", rerun.stderr)]
    assert len(redone) == 2 and 0 < sum(redone) < 60  # each rank resumed: the marked samples were kept
    (a, attrs_a), (b, attrs_b) = _arrays(tmp_path / "one.zarr"), _arrays(out)
    assert a.keys() == b.keys() and attrs_a == attrs_b
    for name in a:
        assert (a[name] == b[name]).all(), name
