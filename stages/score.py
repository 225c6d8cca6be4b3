"""`mimic score`: rescore a predictions file with the official metrics, no model needed.

    mimic score vqa --predictions P --questions Q --annotations A [--okvqa] [--subset] [--json F] [--per-question F]
    mimic score caption --predictions P --annotations A [--json F]
    mimic score chair --predictions P --instances I [--captions C] [--json F]

Each prints a table and, with --json, writes every figure. `mimic evaluate` calls the same functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from tqdm import tqdm

from pipeline.errors import MimicError
from pipeline.metrics import io
from pipeline.metrics.caption import score_captions
from pipeline.metrics.chair import add_caption_objects, objects_from_instances, score_chair
from pipeline.metrics.okvqa_stem import stem_answer
from pipeline.metrics.vqa import score_vqa

app = typer.Typer(help="Score a predictions file with the official metrics.", no_args_is_help=True)

JsonOption = Annotated[Path | None, typer.Option("--json", help="Write every figure to this JSON file.")]


def _print_table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(label) for label, _ in rows)
    typer.echo(title)
    for label, value in rows:
        typer.echo(f"  {label:<{width}}  {value:>8}")


@app.command("vqa")
def vqa(
    predictions: Annotated[Path, typer.Option(help="VQA results: [{question_id, answer}].")],
    questions: Annotated[Path, typer.Option(help="Official questions JSON (VQAv2 / OK-VQA).")],
    annotations: Annotated[Path, typer.Option(help="Official annotations JSON (VQAv2 / OK-VQA).")],
    okvqa: Annotated[
        bool, typer.Option("--okvqa", help="Stem predictions as OK-VQA v1.1 answers were.")
    ] = False,
    subset: Annotated[
        bool, typer.Option("--subset", help="Score only the questions that are predicted.")
    ] = False,
    json_path: JsonOption = None,
    per_question: Annotated[Path | None, typer.Option(help="Write each question's accuracy here.")] = None,
) -> None:
    """VQA accuracy by the official rules: overall, per answer type, per question type."""
    answers = io.load_vqa_predictions(predictions)
    if not answers:
        raise MimicError(f"{predictions}: no predictions")
    question_ids = set(io.load_vqa_question_ids(questions))
    annotated = io.load_vqa_annotations(annotations)
    for question in annotated:
        if question.question_id not in question_ids:
            raise MimicError(f"{annotations}: question_id {question.question_id} is not in {questions}")
    io.check_prediction_ids(
        answers,
        (question.question_id for question in annotated),
        predictions,
        "question_id",
        allow_missing=subset,
        hint=" (pass --subset to score only the predicted questions)",
    )
    if okvqa:
        answers = {
            qid: stem_answer(answer) for qid, answer in tqdm(answers.items(), desc="stemming", leave=False)
        }
    scored = [question for question in annotated if question.question_id in answers]
    scores = score_vqa(answers, tqdm(scored, desc="scoring", leave=False))
    rows = [("overall", f"{scores.overall:.2f}")]
    rows += [
        (f"answer type: {name}", f"{value:.2f}") for name, value in sorted(scores.per_answer_type.items())
    ]
    rows += [
        (f"question type: {name}", f"{value:.2f}") for name, value in sorted(scores.per_question_type.items())
    ]
    _print_table(f"VQA accuracy (%), {len(scored)} questions{', OK-VQA stemming' if okvqa else ''}", rows)
    if json_path:
        io.write_json(json_path, {**scores.to_json(), "okvqa_stemming": okvqa, "subset": subset})
    if per_question:
        io.write_json(per_question, {str(qid): accuracy for qid, accuracy in scores.per_question.items()})


@app.command("caption")
def caption(
    predictions: Annotated[Path, typer.Option(help="Caption results: [{image_id, caption}].")],
    annotations: Annotated[Path, typer.Option(help="COCO captions JSON or the Karpathy split JSON.")],
    json_path: JsonOption = None,
) -> None:
    """CIDEr-D, BLEU-4 and ROUGE-L of the predicted images (as COCOEvalCap scores a results file)."""
    captions = io.load_caption_predictions(predictions)
    if not captions:
        raise MimicError(f"{predictions}: no predictions")
    references = io.load_caption_references(annotations)
    io.check_prediction_ids(captions, references, predictions, "image_id", allow_missing=True)
    scores = score_captions(captions, references)
    rows = [(name, f"{scores[name] * 100:.2f}") for name in ("CIDEr", "Bleu_4", "ROUGE_L")]
    _print_table(f"Caption metrics (x100), {scores['images']} images", rows)
    if json_path:
        io.write_json(json_path, scores)


@app.command("chair")
def chair(
    predictions: Annotated[Path, typer.Option(help="Caption results: [{image_id, caption}].")],
    instances: Annotated[Path, typer.Option(help="COCO instances JSON (instances_val2014.json layout).")],
    captions: Annotated[
        Path | None,
        typer.Option(help="COCO captions JSON: add objects its captions mention, as the paper did."),
    ] = None,
    json_path: JsonOption = None,
) -> None:
    """CHAIR-s, CHAIR-i and object recall of captions against the images' annotated objects."""
    generated = io.load_caption_predictions(predictions)
    if not generated:
        raise MimicError(f"{predictions}: no predictions")
    images, labels = io.load_instances(instances)
    io.check_prediction_ids(generated, images, predictions, "image_id", allow_missing=True)
    ground_truth = objects_from_instances(images, labels)
    if captions:
        add_caption_objects(ground_truth, io.load_caption_references(captions))
    scores = score_chair(generated, ground_truth)
    rows = [("CHAIR-s", f"{scores.chair_s * 100:.2f}"), ("CHAIR-i", f"{scores.chair_i * 100:.2f}")]
    rows.append(("recall", f"{scores.recall * 100:.2f}"))
    _print_table(f"CHAIR (%), {scores.captions} captions, {scores.mentions} object mentions", rows)
    if json_path:
        io.write_json(json_path, scores.to_json())
