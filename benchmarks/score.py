"""Time `mimic score vqa` on 200,000 synthetic predictions in the official layout (target: under 20 s on 2 cores).

    .venv/bin/python benchmarks/score.py [--questions N] [--seed S]

Writes questions, annotations (ten answers each, with answer_id) and predictions to a temporary folder,
then times the command end to end as a subprocess, and its phases in-process. Predictions mix exact
answers, variants that need the normalization (case, articles, punctuation, number words) and misses.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.metrics import io  # noqa: E402
from pipeline.metrics.vqa import score_vqa  # noqa: E402

ANSWER_TYPES = {
    "yes/no": ["yes", "no"],
    "number": [str(n) for n in range(12)],
    "other": [
        "red",
        "blue",
        "white",
        "dog",
        "cat",
        "pizza",
        "tennis",
        "baseball",
        "kitchen",
        "left",
        "hot dog",
        "t-shirt",
        "frisbee",
        "skateboarding",
        "umbrella",
        "train",
        "giraffe",
        "surfing",
        "broccoli",
        "man",
    ],
}
QUESTION_TYPES = [
    "is the",
    "what color is the",
    "how many",
    "what is the",
    "what sport is",
    "where is the",
    "are there",
    "what is the man",
    "does the",
    "which",
    "what type of",
    "is this a",
]
VARIANTS = ["{}", "{}", "{}", "The {}", "{}.", "{}!", "a {}", " {} ", "{}?"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def write_synthetic(folder: Path, count: int, seed: int) -> dict[str, Path]:
    """Questions, annotations and predictions files for `count` questions, deterministic for a seed."""
    rng = random.Random(seed)
    questions, annotations, predictions = [], [], []
    for qid in range(count):
        answer_type = rng.choice(list(ANSWER_TYPES))
        vocabulary = ANSWER_TYPES[answer_type]
        main = rng.choice(vocabulary)
        answers = [main if rng.random() < 0.7 else rng.choice(vocabulary) for _ in range(10)]
        questions.append({"question_id": qid, "image_id": qid // 3, "question": "?"})
        annotations.append(
            {
                "question_id": qid,
                "image_id": qid // 3,
                "question_type": rng.choice(QUESTION_TYPES),
                "answer_type": answer_type,
                "multiple_choice_answer": main,
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                    for i, a in enumerate(answers)
                ],
            }
        )
        guess = main if rng.random() < 0.6 else rng.choice(vocabulary)
        if guess.isdigit() and int(guess) <= 10 and rng.random() < 0.3:
            guess = NUMBER_WORDS[int(guess)]
        predictions.append({"question_id": qid, "answer": rng.choice(VARIANTS).format(guess)})
    header = {"info": {"description": "synthetic"}, "license": {"name": "none"}, "data_subtype": "val2014"}
    files = {
        "questions": folder / "questions.json",
        "annotations": folder / "annotations.json",
        "predictions": folder / "predictions.json",
    }
    files["questions"].write_text(json.dumps({**header, "task_type": "Open-Ended", "questions": questions}))
    files["annotations"].write_text(json.dumps({**header, "annotations": annotations}))
    files["predictions"].write_text(json.dumps(predictions))
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = write_synthetic(Path(tmp), args.questions, args.seed)
        command = [
            sys.executable,
            "-m",
            "stages.cli",
            "score",
            "vqa",
            "--json",
            str(Path(tmp) / "scores.json"),
        ]
        for name in ("predictions", "questions", "annotations"):
            command += [f"--{name}", str(files[name])]
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
        end_to_end = time.perf_counter() - start

        start = time.perf_counter()
        predictions = io.load_vqa_predictions(files["predictions"])
        io.load_vqa_question_ids(files["questions"])
        questions = io.load_vqa_annotations(files["annotations"])
        loaded = time.perf_counter()
        overall = score_vqa(predictions, questions).overall
        scored = time.perf_counter()
        cli_overall = json.loads((Path(tmp) / "scores.json").read_text())["overall"]
    assert cli_overall == overall
    print(f"mimic score vqa, {args.questions:,} synthetic questions (overall {overall:.2f} %)")
    print(f"{'phase':<28}{'seconds':>9}{'per 1k q (ms)':>15}")
    for phase, seconds in [
        ("load + check JSON", loaded - start),
        ("score (official rules)", scored - loaded),
        ("CLI end to end (subprocess)", end_to_end),
    ]:
        print(f"{phase:<28}{seconds:>9.2f}{1000 * seconds / args.questions * 1000:>15.2f}")
    print(f"target: CLI end to end under 20 s -> {'met' if end_to_end < 20 else 'NOT met'}")


if __name__ == "__main__":
    main()
