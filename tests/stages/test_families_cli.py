"""`mimic extract`, `mimic train` and `mimic evaluate` as subprocesses, end to end, for every family: a tiny
checkpoint saved with `save_pretrained` (real tokenizer and processor classes) and VQAv2-layout data whose
JPEGs differ in size and aspect ratio."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import ROOT, cli
from real_checkpoints import FAMILY_NAMES, save_tiny_checkpoint, write_vqa_fixture

from pipeline.cache.store import CacheReader
from pipeline.errors import MimicError


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    return write_vqa_fixture(root, 30, "train2014"), write_vqa_fixture(root, 12, "val2014", seed=1)


def params_for(tmp_path, checkpoint, data, positions: str) -> str:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    train, evaluation = data
    params["model"]["name"] = str(checkpoint)
    params["data"].update(train=train, eval=evaluation, n_support=12, n_train=8, n_eval=6, n_val=0)
    params["extract"].update(k=2, batch_size=4, positions=positions)
    params["train"].update(epochs=1, batch_size=4)
    params["evaluate"].update(k=2, batch_size=3, max_new_tokens=3)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return str(path)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_extract_train_evaluate_end_to_end(name, data, tmp_path):
    checkpoint = save_tiny_checkpoint(name, tmp_path / name)
    positions = "text" if name in ("llava", "qwen2_vl") else "all"  # both choices, on both tokenizer kinds
    params = params_for(tmp_path, checkpoint, data, positions)
    store, run = tmp_path / "teacher.zarr", tmp_path / "mimic"
    cli("extract", "--params", params, "--out", store, check=True)
    reader = CacheReader.open(store)
    assert len(reader) == 8 and reader.fingerprint["positions"] == positions
    if positions == "text":  # no image positions left: each sample holds only its text and answer tokens
        assert max(reader.token_counts) < 30 and min(reader.token_counts) >= reader.answer_counts[0]
    cli("train", "--params", params, "--cache", store, "--run-dir", run, check=True)
    assert (run / "method" / "method_config.json").is_file()
    metrics, predictions, results = (
        tmp_path / "metrics.json",
        tmp_path / "predictions.jsonl",
        tmp_path / "results",
    )
    evaluate = ["evaluate", "--params", params, "--run-dir", run, "--metrics", metrics]
    result = cli(*evaluate, "--predictions", predictions, "--results", results, check=True)
    report = json.loads(metrics.read_text())
    latency = json.loads((tmp_path / "metrics_latency.json").read_text())
    assert report["metric"] == "vqa_accuracy" and "queries=6" in report["about"]
    for method in ("zero_shot", "icl", "mimic"):
        assert 0 <= report["score"][method] <= 100
        assert method in result.stdout
    assert latency["icl"]["prompt_tokens_per_sample"] > latency["zero_shot"]["prompt_tokens_per_sample"]
    evaluation = data[
        1
    ]  # the official VQA result file, rescored by `mimic score vqa`, gives the same accuracy
    rescored = tmp_path / "rescored.json"
    scoring = ["score", "vqa", "--predictions", results / "icl.json", "--subset", "--json", rescored]
    questions, annotations = evaluation["questions_json"], evaluation["annotations_json"]
    cli(*scoring, "--questions", questions, "--annotations", annotations, check=True)
    assert json.loads(rescored.read_text())["overall"] == pytest.approx(report["score"]["icl"], abs=1e-3)
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(rows) == 6 and all(isinstance(r["mimic"]["prediction"], str) for r in rows)


def test_prompts_built_by_worker_threads_write_the_same_store_and_train_the_same_method(data, tmp_path):
    # data.workers > 0: teacher and student batches are built ahead by threads sharing one prompt builder (real
    # Idefics2 processor, images of several sizes); the store equals the one built batch by batch, byte for
    # byte, and so do the trained tensors and the loss log
    from cache_samples import assert_same_store

    from stages.extract import extract
    from stages.train import train

    params = params_for(tmp_path, save_tiny_checkpoint("idefics2", tmp_path / "ck"), data, "all")
    extract(params, tmp_path / "serial.zarr", [])
    extract(params, tmp_path / "workers.zarr", ["data.workers=2"])
    assert_same_store(tmp_path / "serial.zarr", tmp_path / "workers.zarr")
    for workers in (0, 2):
        train(
            params,
            tmp_path / "serial.zarr",
            tmp_path / f"run{workers}",
            [f"data.workers={workers}", "train.epochs=2"],
        )
    for name in ("method/method.safetensors", "train_log.tsv"):
        assert (tmp_path / "run0" / name).read_bytes() == (tmp_path / "run2" / name).read_bytes(), name


def test_a_worker_that_meets_a_corrupt_image_fails_the_stage_as_the_stage_itself_would(tmp_path):
    # the demonstrations' images are first read inside the loop, so by a worker thread: the same one-line error,
    # and no store marked complete
    from pipeline.config import load_params
    from pipeline.splits import make_splits

    root = tmp_path / "vqa"
    data = write_vqa_fixture(root, 30, "train2014"), write_vqa_fixture(root, 12, "val2014", seed=1)
    params = params_for(tmp_path, save_tiny_checkpoint("idefics2", tmp_path / "ck"), data, "all")
    splits = make_splits(load_params(params).data)
    queried = {path for item in splits.train for path in item.images}
    corrupt = sorted({path for item in splits.support for path in item.images} - queried)
    assert corrupt
    for path in corrupt:
        path.write_bytes(b"not a jpeg")
    errors = []
    for workers in (0, 2):
        out = tmp_path / f"w{workers}.zarr"
        result = cli("extract", "--params", params, "--out", out, "-s", f"data.workers={workers}")
        assert result.returncode != 0
        with pytest.raises(MimicError, match="incomplete|does not exist"):  # nothing that reads as complete
            CacheReader.open(out)
        assert "Traceback" not in result.stderr
        errors.append(result.stderr.strip().splitlines()[-1])
    assert errors[0] == errors[1] and "image is unreadable or corrupt" in errors[0]


def test_generation_prompts_built_by_worker_threads_give_the_same_answers(data, tmp_path):
    from stages.evaluate import evaluate

    params = params_for(tmp_path, save_tiny_checkpoint("qwen2_vl", tmp_path / "ck"), data, "all")
    reports = []
    for workers in (0, 2):
        metrics, predictions = tmp_path / f"m{workers}.json", tmp_path / f"p{workers}.jsonl"
        reports.append(evaluate(params, [], metrics, predictions, [f"data.workers={workers}"]))
        reports[-1]["predictions"] = predictions.read_text()
    assert (
        reports[0]["score"] == reports[1]["score"] and reports[0]["predictions"] == reports[1]["predictions"]
    )
    for method in ("zero_shot", "icl", "rices"):
        tokens = [r["latency"][method]["prompt_tokens_per_sample"] for r in reports]
        assert tokens[0] == tokens[1]
