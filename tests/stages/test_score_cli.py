"""`mimic score` run as a subprocess on files in the released layouts, built in tmp_path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.errors import MimicError
from stages import score

ROOT = Path(__file__).resolve().parents[2]


def _start(*args: str | Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "stages.cli", "score", *map(str, args)]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


def _answers(*texts: str) -> list[dict]:
    return [{"answer": text, "answer_confidence": "yes", "answer_id": i + 1} for i, text in enumerate(texts)]


def _vqa_fixture(tmp_path: Path) -> dict[str, Path]:
    """Three questions in the VQAv2 / OK-VQA layout, with predictions for all of them."""
    header = {"info": {"version": "2.0"}, "license": {"name": "CC BY 4.0"}, "data_subtype": "val2014"}
    annotations = [
        {
            "question_id": 10,
            "image_id": 1,
            "question_type": "is the",
            "answer_type": "yes/no",
            "answers": _answers(*["yes"] * 10),
        },
        {
            "question_id": 20,
            "image_id": 1,
            "question_type": "how many",
            "answer_type": "number",
            "answers": _answers(*["2"] * 3, *["3"] * 7),
        },
        {
            "question_id": 30,
            "image_id": 2,
            "question_type": "what is",
            "answer_type": "other",
            "answers": _answers(*["hot dog"] * 10),
        },
    ]
    questions = [
        {"question_id": a["question_id"], "image_id": a["image_id"], "question": "?"} for a in annotations
    ]
    predictions = [
        {"question_id": 10, "answer": "yes"},
        {"question_id": 20, "answer": "two"},
        {"question_id": 30, "answer": "hot dogs"},
    ]
    return {
        "questions": _write(
            tmp_path / "questions.json", {**header, "task_type": "Open-Ended", "questions": questions}
        ),
        "annotations": _write(tmp_path / "annotations.json", {**header, "annotations": annotations}),
        "predictions": _write(tmp_path / "predictions.json", predictions),
    }


def _vqa_args(files: dict[str, Path]) -> list:
    return [
        "vqa",
        "--predictions",
        files["predictions"],
        "--questions",
        files["questions"],
        "--annotations",
        files["annotations"],
    ]


def _assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mimic: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


# Subprocess cases, started at once: `python -m stages.cli` imports every stage (torch included, seconds
# each), so the file-level errors run as real processes side by side and the id errors run in-process.
def _break_vqa(files: dict[str, Path], case: str) -> list:
    """Damage the fixture files as `case` says; return the extra CLI arguments."""
    if case == "missing_predictions":
        _write(files["predictions"], [{"question_id": 20, "answer": "3"}])
    elif case == "unknown_id":
        _write(files["predictions"], [{"question_id": 99, "answer": "3"}, {"question_id": 98, "answer": "3"}])
    elif case == "duplicate_id":
        _write(files["predictions"], [{"question_id": q, "answer": "3"} for q in (10, 20, 20, 30, 30)])
    elif case == "missing_file":
        files["questions"] = files["questions"].with_name("nowhere.json")
    elif case == "invalid_json":
        _write(files["annotations"], '{"annotations": [')
    elif case == "missing_key":
        data = json.loads(files["annotations"].read_text())
        del data["annotations"][1]["answer_type"]
        _write(files["annotations"], data)
    elif case == "wrong_type":
        _write(files["predictions"], [{"question_id": "10", "answer": "yes"}])
    elif case == "ok":
        return [
            "--json",
            files["predictions"].with_name("scores.json"),
            "--per-question",
            files["predictions"].with_name("pq.json"),
        ]
    return []


SUBPROCESS_CASES = ("ok", "missing_predictions", "missing_file", "invalid_json", "missing_key", "wrong_type")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    started = {}
    for case in SUBPROCESS_CASES:
        files = _vqa_fixture(tmp_path_factory.mktemp(case))
        extra = _break_vqa(files, case)
        started[case] = (_start(*_vqa_args(files), *extra), files["predictions"].parent)
    results = {}
    for case, (process, folder) in started.items():
        stdout, stderr = process.communicate(timeout=300)
        results[case] = (
            subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr),
            folder,
        )
    return results


def test_vqa_scores_table_json_and_per_question(runs) -> None:
    result, folder = runs["ok"]
    assert result.returncode == 0, result.stderr
    assert "overall" in result.stdout and "63.33" in result.stdout
    scores = json.loads((folder / "scores.json").read_text())
    # yes: 100; "two" -> "2" matches 3 of 10: 90; "hot dogs" is not "hot dog": 0. Mean 63.33.
    assert scores["overall"] == 63.33
    assert scores["perAnswerType"] == {"yes/no": 100.0, "number": 90.0, "other": 0.0}
    assert scores["perQuestionType"]["how many"] == 90.0
    assert json.loads((folder / "pq.json").read_text()) == {"10": 100.0, "20": 90.0, "30": 0.0}


@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("missing_predictions", ("predictions.json", "2 of 3", "--subset")),
        ("missing_file", ("nowhere.json", "no such file")),
        ("invalid_json", ("annotations.json", "invalid JSON", "line 1")),
        ("missing_key", ("annotations.json", "annotations[1]", "'answer_type'")),
        ("wrong_type", ("predictions.json", "entry 0", "must be an integer, got a string")),
    ],
)
def test_bad_input_is_one_line_error(runs, case: str, fragments: tuple[str, ...]) -> None:
    _assert_one_line_error(runs[case][0], *fragments)


# In-process runs of the same typer app for the remaining paths (the entry point is covered above).
def _invoke(*args: str | Path):
    return CliRunner().invoke(score.app, [str(arg) for arg in args])


def _assert_mimic_error(result, *fragments: str) -> None:
    assert isinstance(result.exception, MimicError), result.output
    message = str(result.exception)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("unknown_id", ("predictions.json", "question_id 99 is not in the annotations")),
        ("duplicate_id", ("predictions.json", "question_id 20 appears more than once")),
    ],
)
def test_vqa_id_errors_name_the_first_id(tmp_path: Path, case: str, fragments: tuple[str, ...]) -> None:
    files = _vqa_fixture(tmp_path)
    _break_vqa(files, case)
    _assert_mimic_error(_invoke(*_vqa_args(files)), *fragments)


def test_chair_wrong_type_in_instances(tmp_path: Path) -> None:
    coco = _coco_fixture(tmp_path)
    data = json.loads(coco["instances"].read_text())
    data["annotations"][2]["category_id"] = None
    _write(coco["instances"], data)
    result = _invoke("chair", "--predictions", coco["predictions"], "--instances", coco["instances"])
    _assert_mimic_error(
        result, "instances_val2014.json: annotations[2]: 'category_id' must be an integer, got null"
    )


def test_vqa_okvqa_stems_predictions(tmp_path: Path) -> None:
    files = _vqa_fixture(tmp_path)
    out = tmp_path / "scores.json"
    result = _invoke(*_vqa_args(files), "--okvqa", "--json", out)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["perAnswerType"]["other"] == 100.0  # "hot dogs" -> "hot dog"


def test_vqa_subset_scores_only_predicted_questions(tmp_path: Path) -> None:
    files = _vqa_fixture(tmp_path)
    _write(files["predictions"], [{"question_id": 20, "answer": "3"}])
    out = tmp_path / "scores.json"
    assert _invoke(*_vqa_args(files), "--subset", "--json", out).exit_code == 0
    assert json.loads(out.read_text())["overall"] == 100.0


def test_wrong_layout_top_level(tmp_path: Path) -> None:
    files = _vqa_fixture(tmp_path)
    _write(files["predictions"], {"question_id": 10, "answer": "yes"})
    _assert_mimic_error(_invoke(*_vqa_args(files)), "predictions.json: expected a JSON array")


def _coco_fixture(tmp_path: Path) -> dict[str, Path]:
    """Two images in the COCO caption and instance layouts, and captions predicted for both."""
    images = [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}]
    captions = [
        {"id": 1, "image_id": 1, "caption": "A dog lying on a couch."},
        {"id": 2, "image_id": 1, "caption": "A brown dog sleeps on the sofa."},
        {"id": 3, "image_id": 2, "caption": "A man riding a horse."},
        {"id": 4, "image_id": 2, "caption": "A person on a horse in a field."},
    ]
    categories = [
        {"id": 1, "name": "person", "supercategory": "person"},
        {"id": 18, "name": "dog"},
        {"id": 19, "name": "horse"},
    ]
    instances = [
        {"id": 1, "image_id": 1, "category_id": 18},
        {"id": 2, "image_id": 2, "category_id": 1},
        {"id": 3, "image_id": 2, "category_id": 19},
    ]
    predictions = [
        {"image_id": 1, "caption": "A dog on a couch with a cat."},
        {"image_id": 2, "caption": "A man riding a horse."},
    ]
    return {
        "captions": _write(
            tmp_path / "captions_val2014.json", {"info": {}, "images": images, "annotations": captions}
        ),
        "instances": _write(
            tmp_path / "instances_val2014.json",
            {"images": images, "annotations": instances, "categories": categories},
        ),
        "predictions": _write(tmp_path / "captions_pred.json", predictions),
    }


def test_caption_scores(tmp_path: Path) -> None:
    coco = _coco_fixture(tmp_path)
    out = tmp_path / "scores.json"
    result = _invoke(
        "caption", "--predictions", coco["predictions"], "--annotations", coco["captions"], "--json", out
    )
    assert result.exit_code == 0, result.output
    scores = json.loads(out.read_text())
    assert set(scores) == {"CIDEr", "Bleu_4", "ROUGE_L", "images"} and scores["images"] == 2
    assert "CIDEr" in result.output


def test_caption_unknown_image(tmp_path: Path) -> None:
    coco = _coco_fixture(tmp_path)
    _write(coco["predictions"], [{"image_id": 7, "caption": "A cat."}])
    result = _invoke("caption", "--predictions", coco["predictions"], "--annotations", coco["captions"])
    _assert_mimic_error(result, "captions_pred.json: image_id 7 is not in the annotations")


def test_chair_scores(tmp_path: Path) -> None:
    coco = _coco_fixture(tmp_path)
    out = tmp_path / "chair.json"
    args = ["chair", "--predictions", coco["predictions"], "--instances", coco["instances"], "--json", out]
    result = _invoke(*args)
    assert result.exit_code == 0, result.output
    scores = json.loads(out.read_text())
    # Image 1 mentions dog, couch, cat against {dog}: couch and cat hallucinated. Image 2: person, horse, both true.
    assert (scores["mentions"], scores["hallucinated_mentions"]) == (5, 2)
    assert scores["CHAIRs"] == 0.5 and scores["CHAIRi"] == pytest.approx(2 / 5)
    # With the ground-truth captions, as in the paper, "couch" is no longer a hallucination.
    assert _invoke(*args, "--captions", coco["captions"]).exit_code == 0
    assert json.loads(out.read_text())["hallucinated_mentions"] == 1
