"""Load and check the JSON files the metrics read; every problem is one MimicError naming the file and entry.

Layouts are the released ones: VQA results `[{"question_id", "answer"}]`, VQA questions and annotations
(VQAv2 / OK-VQA), caption results `[{"image_id", "caption"}]`, COCO caption annotations or the Karpathy
split file, and COCO instance annotations. Keys the metrics do not use are allowed and ignored.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.errors import MimicError
from pipeline.metrics.chair import CATEGORY_OF
from pipeline.metrics.vqa import VqaQuestion

_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "an integer", float: "a number"}


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _is(value: Any, kind: type) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


def read_json(path: Path) -> Any:
    """Parse a JSON file; a missing, unreadable or malformed file is a MimicError naming it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MimicError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise MimicError(f"{path}: cannot read ({err})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise MimicError(
            f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from None


def _get(entry: Any, key: str, kind: type, where: str) -> Any:
    """entry[key], checked to be of `kind`."""
    if not isinstance(entry, dict):
        raise MimicError(f"{where} must be an object, got {_type_name(entry)}")
    if key not in entry:
        raise MimicError(f"{where} has no key {key!r}")
    value = entry[key]
    if not _is(value, kind):
        raise MimicError(f"{where}: {key!r} must be {_JSON_TYPES[kind]}, got {_type_name(value)}")
    return value


def _array(data: Any, key: str | None, path: Path) -> list:
    """The top-level array, or the array under `key` of the top-level object."""
    if key is None:
        if not isinstance(data, list):
            raise MimicError(f"{path}: expected a JSON array of results, got {_type_name(data)}")
        return data
    return _get(data, key, list, f"{path}: the top level")


def _ids_once(ids: Iterable[int], path: Path, what: str) -> None:
    seen: set[int] = set()
    for identifier in ids:
        if identifier in seen:
            raise MimicError(f"{path}: {what} {identifier} appears more than once")
        seen.add(identifier)


def load_vqa_predictions(path: Path) -> dict[int, str]:
    """VQA results file: `{question_id: answer}` in file order; a repeated question id is an error."""
    entries = _array(read_json(path), None, path)
    pairs = []
    for i, entry in enumerate(entries):
        where = f"{path}: entry {i}"
        pairs.append((_get(entry, "question_id", int, where), _get(entry, "answer", str, where)))
    _ids_once((qid for qid, _ in pairs), path, "question_id")
    return dict(pairs)


def load_vqa_question_ids(path: Path) -> list[int]:
    """Question ids of an official questions file (`{"questions": [{"question_id", ...}]}`)."""
    entries = _array(read_json(path), "questions", path)
    ids = [_get(entry, "question_id", int, f"{path}: questions[{i}]") for i, entry in enumerate(entries)]
    _ids_once(ids, path, "question_id")
    return ids


def _record_keys(records: list[dict]) -> tuple[str, ...] | None:
    """Each answer record's other fields, canonical; None when the records are distinct anyway."""
    ids = [record.get("answer_id") for record in records]
    if all(type(i) is int for i in ids) and len(set(ids)) == len(ids):  # the released files: answer_id 1..10
        return None
    keys = tuple(
        json.dumps({key: value for key, value in record.items() if key != "answer"}, sort_keys=True)
        for record in records
    )
    return None if len(set(keys)) == len(keys) else keys


def _vqa_question(entry: Any, where: str) -> VqaQuestion:
    question_id = _get(entry, "question_id", int, where)
    where = f"{where} (question_id {question_id})"
    records = _get(entry, "answers", list, where)
    if not records:
        raise MimicError(f"{where}: 'answers' is empty")
    for j, record in enumerate(records):
        if type(record) is not dict or type(record.get("answer")) is not str:  # fast check, message from _get
            _get(record, "answer", str, f"{where}: answers[{j}]")
    return VqaQuestion(
        question_id=question_id,
        question_type=_get(entry, "question_type", str, where),
        answer_type=_get(entry, "answer_type", str, where),
        answers=tuple(record["answer"] for record in records),
        record_keys=_record_keys(records),
    )


def load_vqa_annotations(path: Path) -> list[VqaQuestion]:
    """Official annotations file (`{"annotations": [...]}`), in file order (the official scoring order)."""
    entries = _array(read_json(path), "annotations", path)
    questions = [_vqa_question(entry, f"{path}: annotations[{i}]") for i, entry in enumerate(entries)]
    _ids_once((question.question_id for question in questions), path, "question_id")
    return questions


def check_prediction_ids(
    predicted: Iterable[int],
    known: Iterable[int],
    path: Path,
    what: str,
    *,
    allow_missing: bool,
    hint: str = "",
) -> None:
    """Every predicted id must be known; unless `allow_missing`, every known id must be predicted."""
    known_set = set(known)
    predicted_set = set()
    for identifier in predicted:
        if identifier not in known_set:
            raise MimicError(f"{path}: {what} {identifier} is not in the annotations")
        predicted_set.add(identifier)
    missing = len(known_set - predicted_set)
    if missing and not allow_missing:
        raise MimicError(
            f"{path}: {missing} of {len(known_set)} {what}s of the annotations have no prediction{hint}"
        )


def load_caption_predictions(path: Path) -> dict[int, str]:
    """Caption results file: `{image_id: caption}` in file order; a repeated image id is an error."""
    entries = _array(read_json(path), None, path)
    pairs = []
    for i, entry in enumerate(entries):
        where = f"{path}: entry {i}"
        pairs.append((_get(entry, "image_id", int, where), _get(entry, "caption", str, where)))
    _ids_once((image for image, _ in pairs), path, "image_id")
    return dict(pairs)


def load_caption_references(path: Path) -> dict[int, list[str]]:
    """Reference captions per image from COCO captions (`annotations`) or the Karpathy split (`images`)."""
    data = read_json(path)
    references: dict[int, list[str]] = {}
    if isinstance(data, dict) and "annotations" in data:
        for i, entry in enumerate(_array(data, "annotations", path)):
            where = f"{path}: annotations[{i}]"
            image = _get(entry, "image_id", int, where)
            references.setdefault(image, []).append(_get(entry, "caption", str, where))
        return references
    if isinstance(data, dict) and "images" in data:  # Karpathy split: images[].sentences[].raw
        for i, entry in enumerate(_array(data, "images", path)):
            where = f"{path}: images[{i}]"
            image = _get(
                entry, "cocoid" if isinstance(entry, dict) and "cocoid" in entry else "imgid", int, where
            )
            sentences = _get(entry, "sentences", list, where)
            references[image] = [
                _get(s, "raw", str, f"{where}: sentences[{j}]") for j, s in enumerate(sentences)
            ]
        return references
    raise MimicError(f"{path}: expected COCO captions (key 'annotations') or a Karpathy split (key 'images')")


def load_instances(path: Path) -> tuple[list[int], list[tuple[int, str]]]:
    """COCO instances file: all image ids, and one (image id, category name) pair per annotated instance."""
    data = read_json(path)
    names: dict[int, str] = {}
    for i, entry in enumerate(_array(data, "categories", path)):
        where = f"{path}: categories[{i}]"
        category, name = _get(entry, "id", int, where), _get(entry, "name", str, where)
        if name not in CATEGORY_OF:
            raise MimicError(
                f"{where}: category {name!r} is not an MSCOCO category of the CHAIR synonym list"
            )
        names[category] = name
    images = [
        _get(entry, "id", int, f"{path}: images[{i}]") for i, entry in enumerate(_array(data, "images", path))
    ]
    labels = []
    for i, entry in enumerate(_array(data, "annotations", path)):
        where = f"{path}: annotations[{i}]"
        image, category = _get(entry, "image_id", int, where), _get(entry, "category_id", int, where)
        if category not in names:
            raise MimicError(f"{where}: category_id {category} is not in 'categories'")
        labels.append((image, names[category]))
    return images, labels


def write_json(path: Path, data: Any) -> None:
    """Write a results file (indent 2, sorted keys); an unwritable path is a MimicError."""
    try:
        Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    except OSError as err:
        raise MimicError(f"{path}: cannot write ({err.strerror})") from None
