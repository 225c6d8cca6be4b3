"""The experiment workflow as a researcher runs it: the cache follows data content, inputs are checked before
any model is loaded, outputs are whole or absent. Every check runs the CLI as a subprocess."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml
from conftest import ROOT, cli, overrides
from real_checkpoints import save_tiny_checkpoint, write_vqa_fixture

PARAMS = ROOT / "params.yaml"


def last_line(result) -> str:
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def vqa_run(tmp_path_factory):
    """A tiny LLaVA checkpoint, a VQAv2-layout dataset, its params file and an extracted cache."""
    root = tmp_path_factory.mktemp("workflow")
    checkpoint = save_tiny_checkpoint("llava", root / "model")
    data = write_vqa_fixture(root / "data", 24, "train2014")
    held_out = write_vqa_fixture(root / "data", 6, "val2014", seed=1)
    params = yaml.safe_load(PARAMS.read_text())
    params["model"]["name"] = str(checkpoint)
    params["data"].update(train=data, eval=held_out, n_support=12, n_train=6, n_eval=6, n_val=0)
    params["extract"].update(k=2, batch_size=4)
    params["train"].update(epochs=1, batch_size=3)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    cli("extract", "--params", path, "--out", root / "teacher.zarr", check=True)
    return root, path, params


def train(root, params_path, *extra):
    return cli(
        "train", "--params", params_path, "--cache", root / "teacher.zarr", "--run-dir", root / "run", *extra
    )


def test_a_moved_dataset_keeps_its_cache_an_edited_one_does_not(vqa_run, tmp_path):
    root, _, params = vqa_run
    moved = tmp_path / "elsewhere"
    shutil.copytree(root / "data", moved)
    relocated = json.loads(json.dumps(params).replace(str(root / "data"), str(moved)))
    path = tmp_path / "moved.yaml"
    path.write_text(yaml.safe_dump(relocated))
    assert train(root, path).returncode == 0  # same content elsewhere: the cache is valid

    annotations = moved / "v2_mscoco_train2014_annotations.json"
    doc = json.loads(annotations.read_text())
    for record in doc["annotations"]:  # every answer replaced in place, same ids, same sizes of lists
        for answer in record["answers"]:
            answer["answer"] = "dog"
        record["multiple_choice_answer"] = "dog"
    annotations.write_text(json.dumps(doc))
    result = train(root, path)
    assert result.returncode == 2 and "written for another data" in last_line(result)

    shutil.copytree(root / "data", moved, dirs_exist_ok=True)  # answers back; now one image's bytes change
    image = next((moved / "train2014").glob("*.jpg"))
    image.write_bytes(next((moved / "val2014").glob("*.jpg")).read_bytes())
    result = train(root, path)
    assert result.returncode == 2 and "written for another data" in last_line(result)


@pytest.fixture(scope="module")
def unreadable_weights(tmp_path_factory):
    """The embedded model's config and processor with garbage weights: a check made after the weights are read
    fails on them instead of giving its own message."""
    from pipeline.embedded import MODEL_DIR

    path = tmp_path_factory.mktemp("broken") / "model"
    shutil.copytree(MODEL_DIR, path)
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    return path


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=0", "train.epochs=0: must be at least 1"),
        ("extract.k=0", "extract.k=0: must be at least 1"),
        ("evaluate.num_beams=0", "evaluate.num_beams=0: must be at least 1"),
        ("evaluate.max_new_tokens=0", "evaluate.max_new_tokens=0: must be at least 1"),
        ("train.batch_size=-2", "train.batch_size=-2: must be at least 1"),
        ("extract.layers=[0, 7]", "the model has 4 decoder layers (0..3)"),
        ("model.device=cuda", "this machine has no cuda device"),
        ("methods.mimic.lr=[1", "is not valid YAML"),
        ("methods.mimic.lr=fast", "methods.mimic.lr must be a number, got 'fast'"),
        ("methods.mimic.lr=.inf", "lr=inf: must be positive"),
        ("train.method=bogus", "train.method / trained name ['bogus']"),
        ("extract.site=bogus", "extract.site='bogus': choose one of attn, mlp, layer"),
        ("train.precision=bf16", "train.precision=bf16 needs a GPU"),
        ("extract.k=500", "extract.k=500 demonstrations, but data.n_support=40"),
        ("data.train.taks=shape", "data.train"),
    ],
)
def test_bad_inputs_fail_in_one_line_before_any_model_is_loaded(
    tmp_path, unreadable_weights, override, message
):
    args = overrides(f"model.name={unreadable_weights}", override)
    if override.startswith("data."):  # train would first say that the cache is missing
        result = cli("extract", "--out", tmp_path / "store.zarr", *args)
    else:
        result = cli("train", "--run-dir", tmp_path / "run", "--cache", tmp_path / "none.zarr", *args)
    assert result.returncode == 2, result.stderr[-500:]
    assert message in last_line(result) and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
    if override.startswith("extract."):  # extract refuses it too, and leaves no store behind
        result = cli("extract", "--out", tmp_path / "store.zarr", *args)
        assert (
            result.returncode == 2 and message in last_line(result) and not (tmp_path / "store.zarr").exists()
        )


def test_yaml_floats_and_nested_overrides_are_accepted(tmp_path):
    from pipeline.config import load_params

    raw = yaml.safe_load(PARAMS.read_text())
    raw["methods"]["mimic"]["lr"] = "1e-3"  # what PyYAML makes of `lr: 1e-3`
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    from pipeline.methods import method_configs

    assert method_configs(load_params(path).methods)["mimic"].lr == 1e-3
    params = load_params(
        path, ["methods.mimic.lr=5E-4", "data.train.questions_json=/data/q.json", "data.train.n=8"]
    )
    assert (
        method_configs(params.methods)["mimic"].lr == 5e-4
        and params.data.train["questions_json"] == "/data/q.json"
    )
    assert params.data.train["n"] == 8


def test_outputs_that_cannot_be_written_fail_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = cli(
        "evaluate", "--metrics", blocker / "m.json", "--predictions", tmp_path / "p.jsonl", *overrides()
    )
    assert result.returncode == 2 and f"output file {blocker / 'm.json'} cannot be written" in last_line(
        result
    )
    assert "Loading weights" not in result.stderr
    result = cli("extract", "--out", "/proc/mimic/teacher.zarr", *overrides())
    assert result.returncode == 2 and "teacher store /proc/mimic/teacher.zarr cannot be written" in last_line(
        result
    )
    result = cli("train", "--run-dir", blocker, "--cache", tmp_path / "none.zarr", *overrides())
    assert result.returncode == 2 and "cannot be written" in last_line(result)


def strict(text: str):
    """json.loads that refuses NaN and Infinity, as strict JSON readers do."""
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name}"))


def test_captions_report_cider_bleu_rouge_in_strict_json(tmp_path):
    from real_checkpoints import fixture_image

    root = tmp_path / "coco"
    captions = ["a red square", "two blue squares", "a green square on grey", "red and grey", "blue", "green"]
    images = []
    for n, caption in enumerate(captions):
        name = f"COCO_val2014_{n + 1:012d}.jpg"
        (root / "val2014").mkdir(parents=True, exist_ok=True)
        fixture_image(("red", "blue", "green")[n % 3], 1 + n % 2, (32 + 8 * n, 32)).save(
            root / "val2014" / name
        )
        sentences = [{"raw": caption}, {"raw": f"{caption} here"}]
        images.append(
            {
                "filepath": "val2014",
                "filename": name,
                "split": "test",
                "sentences": sentences,
                "cocoid": n + 1,
            }
        )
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"images": images, "dataset": "coco"}))
    source = f"{{kind: coco_karpathy, karpathy_json: {karpathy}, image_root: {root}, split: test}}"
    metrics, predictions, results = tmp_path / "m.json", tmp_path / "p.jsonl", tmp_path / "results"
    evaluate = ["evaluate", "--metrics", metrics, "--predictions", predictions, "--results", results]
    settings = overrides(f"data.eval={source}", "data.n_eval=6", "evaluate.methods=[zero_shot, icl]")
    result = cli(*evaluate, *settings, check=True)
    report = strict(metrics.read_text())
    assert report["metric"] == "cider_d" and "kind=coco_karpathy" in report["about"]
    for method in ("zero_shot", "icl"):
        assert set(report["captions"][method]) == {"bleu4", "rouge_l"} and report["score"][method] >= 0
        official = strict((results / f"{method}.json").read_text())
        assert [o["image_id"] for o in official] == list(range(1, 7)) and all(
            "caption" in o for o in official
        )
    rows = [strict(line) for line in predictions.read_text().splitlines()]
    assert len(rows) == 6 and all(r["icl"]["score"] is None for r in rows)  # CIDEr-D has no per-item score
    rescored = tmp_path / "rescored.json"
    scoring = ["score", "caption", "--predictions", results / "icl.json", "--annotations", karpathy]
    cli(*scoring, "--json", rescored, check=True)  # the official result file, scored by `mimic score`
    again = json.loads(rescored.read_text())
    assert 100 * again["CIDEr"] == pytest.approx(report["score"]["icl"], abs=1e-3)
    assert 100 * again["Bleu_4"] == pytest.approx(report["captions"]["icl"]["bleu4"], abs=1e-3)
    assert "cider_d" in result.stdout.strip().splitlines()[-3]


def test_a_written_float_and_a_nested_override_reach_the_run(tmp_path):
    text = PARAMS.read_text().replace("lr: 0.03", "lr: 1e-3")
    assert "lr: 1e-3" in text
    path = tmp_path / "params.yaml"
    path.write_text(text)
    # the run gets past parsing (lr as written, a nested data field) and stops at the device check
    result = cli("train", "--params", path, "-s", "data.train.task=shape", "-s", "model.device=cuda:3")
    assert result.returncode == 2 and "model.device='cuda:3'" in last_line(result)


def test_rising_alignment_loss_is_reported(tmp_path):
    store = tmp_path / "teacher.zarr"
    cli("extract", "--out", store, *overrides(), check=True)
    result = cli(
        "train",
        "--cache",
        store,
        "--run-dir",
        tmp_path / "run",
        *overrides("methods.mimic.lr=100", "train.warmup=0.6", "train.epochs=3"),
    )
    assert result.returncode == 0
    info = json.loads((tmp_path / "run" / "train_info.json").read_text())
    assert info["last_align"] > info["first_align"]
    assert "the alignment loss rose over training" in result.stderr
    assert re.search(r"mimic: 100%\|[^|]*\| 9/9 ", result.stderr)  # one bar over all epochs: a total ETA
    assert (tmp_path / "run" / "train_curves.png").read_bytes()[:4] == b"\x89PNG"
