"""Items from local files: VQAv2 / OK-VQA, COCO Karpathy captions, any table `datasets` reads, the embedded suite.

Loaders keep images as file paths until `load_image` opens them, so a split of 200k questions costs
only its text in memory, and a bad image fails by name when it is first used. Nothing here downloads.
"""

from __future__ import annotations

import inspect
import io
import json
import random
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.errors import MimicError, one_line

# Official COCO 2014 file names, e.g. COCO_val2014_000000000042.jpg
COCO_PATTERN = "COCO_{subtype}_{image_id:012d}.jpg"
KARPATHY_SPLITS: dict[str, tuple[str, ...]] = {  # split asked for -> `split` values in dataset_coco.json
    "train": ("train", "restval"),  # Karpathy's "restval" images are training images
    "restval": ("restval",),
    "val": ("val",),
    "test": ("test",),
}
_TABLE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}
# What PIL raises on missing, truncated or garbage image data.
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Item:
    """One question (empty for captioning) about one or more images, with every reference answer."""

    id: str
    images: tuple[Path | Image.Image, ...]  # lazy file paths or decoded images, in prompt order
    question: str
    answers: tuple[str, ...]  # all references, duplicates kept: the VQA metric counts agreement


_DECODING = threading.Lock()  # one in-memory image decoded at a time


def load_image(image: Path | str | Image.Image) -> Image.Image:
    """Open one image of an `Item` as RGB; a missing or corrupt file raises a MimicError naming it. Safe from
    several threads (pipeline/prefetch.py): a file is opened anew each time, and an in-memory image (a table's
    bytes, decoded on first use: PIL's lazy decoding is not thread-safe) is converted under a lock."""
    if isinstance(image, Image.Image):
        try:
            with _DECODING:
                return image.convert("RGB")
        except _IMAGE_ERRORS as exc:
            name = getattr(image, "filename", "") or "an in-memory image from a table"
            raise MimicError(
                f"image could not be decoded: {name} ({one_line(exc)}); replace it in the data"
            ) from exc
    path = Path(image)
    if not path.is_file():
        raise MimicError(f"image not found: {path}; check image_dir/image_root and the image file names")
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except _IMAGE_ERRORS as exc:
        raise MimicError(
            f"image is unreadable or corrupt: {path} ({one_line(exc)}); re-download or remove it"
        ) from exc


def load_vqa(
    questions_json: Path | str,
    annotations_json: Path | str,
    image_dir: Path | str,
    image_pattern: str = COCO_PATTERN,
) -> list[Item]:
    """VQAv2 or OK-VQA in the official layout: questions file + annotations file + COCO image folder.

    id is the question_id, answers the ten human answers of the annotation (duplicates kept).
    `image_pattern` may use {subtype} (the questions file's data_subtype) and {image_id}.
    """
    questions_json, annotations_json, image_dir = (
        Path(questions_json),
        Path(annotations_json),
        Path(image_dir),
    )
    questions_doc = _read_json(questions_json, "questions file")
    annotations_doc = _read_json(annotations_json, "annotations file")
    _require_dir(image_dir, "image_dir", "the COCO image folder, e.g. val2014/")
    subtype = (
        _field(questions_doc, "data_subtype", questions_json, "the top level")
        if "{subtype" in image_pattern
        else ""
    )
    questions = _list_field(questions_doc, "questions", questions_json, "the top level")
    annotations = _list_field(annotations_doc, "annotations", annotations_json, "the top level")
    by_question = {
        _field(a, "question_id", annotations_json, f"annotations[{i}]"): i for i, a in enumerate(annotations)
    }

    items = []
    for i, question in enumerate(questions):
        where = f"questions[{i}]"
        question_id = _field(question, "question_id", questions_json, where)
        image_id = _field(question, "image_id", questions_json, where)
        if question_id not in by_question:
            raise MimicError(
                f"{questions_json}: question_id {question_id} has no annotation in {annotations_json}; "
                "use the annotations file of the same split"
            )
        a = by_question[question_id]
        answers = _list_field(annotations[a], "answers", annotations_json, f"annotations[{a}]")
        texts = tuple(
            str(_field(answer, "answer", annotations_json, f"annotations[{a}].answers[{j}]"))
            for j, answer in enumerate(answers)
        )
        image = image_dir / _image_name(image_pattern, subtype, image_id)
        text = str(_field(question, "question", questions_json, where))
        items.append(Item(str(question_id), (image,), text, texts))
    if not items:
        raise MimicError(
            f"questions file {questions_json} holds no questions; point questions_json at a non-empty split"
        )
    return items


def load_coco_karpathy(karpathy_json: Path | str, image_root: Path | str, split: str = "test") -> list[Item]:
    """COCO captioning with Karpathy's split file (dataset_coco.json); "train" includes "restval".

    id is the cocoid, question is "", answers are the raw reference captions. Images are
    image_root/filepath/filename, so image_root is the folder holding train2014/ and val2014/.
    """
    karpathy_json, image_root = Path(karpathy_json), Path(image_root)
    if split not in KARPATHY_SPLITS:
        raise MimicError(
            f"unknown Karpathy split '{split}' for {karpathy_json}; use one of {', '.join(KARPATHY_SPLITS)}"
        )
    doc = _read_json(karpathy_json, "Karpathy split file")
    _require_dir(image_root, "image_root", "the folder holding train2014/ and val2014/")
    items = []
    for i, record in enumerate(_list_field(doc, "images", karpathy_json, "the top level")):
        where = f"images[{i}]"
        if _field(record, "split", karpathy_json, where) not in KARPATHY_SPLITS[split]:
            continue
        sentences = _list_field(record, "sentences", karpathy_json, where)
        captions = tuple(
            str(_field(s, "raw", karpathy_json, f"{where}.sentences[{j}]")) for j, s in enumerate(sentences)
        )
        image = (
            image_root
            / _field(record, "filepath", karpathy_json, where)
            / _field(record, "filename", karpathy_json, where)
        )
        items.append(Item(str(_field(record, "cocoid", karpathy_json, where)), (image,), "", captions))
    if not items:
        raise MimicError(
            f"Karpathy split file {karpathy_json} has no images in split '{split}'; check the file and split"
        )
    return items


def load_table(
    path: Path | str,
    image_column: str = "image",
    question_column: str = "question",
    answers_column: str = "answers",
    id_column: str | None = None,
    image_root: Path | str | None = None,
) -> list[Item]:
    """Any table on disk: .parquet, .arrow, .json/.jsonl, .csv, or a `save_to_disk` folder.

    An image cell is a path (relative to image_root, else to the table's folder), bytes, a datasets
    Image dict {"bytes", "path"}, or a list of those; answers are a string, a list of strings, or VQA
    answer dicts. question_column "" means no questions (captioning); id_column None numbers the rows.
    """
    path = Path(path)
    dataset = _read_table(path)
    columns = [image_column, answers_column] + [c for c in (question_column, id_column) if c]
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise MimicError(
            f"table {path} has no column {', '.join(repr(c) for c in missing)} "
            f"(columns: {', '.join(dataset.column_names)}); set the matching *_column option"
        )
    root = Path(image_root) if image_root is not None else (path if path.is_dir() else path.parent)
    cells = _read_cells(dataset, columns)
    items = []
    for row in range(dataset.num_rows):
        images = tuple(
            _table_image(cell, root, path, row, image_column) for cell in _as_cells(cells[image_column][row])
        )
        question = (
            _table_text(cells[question_column][row], path, row, question_column) if question_column else ""
        )
        answers = _table_answers(cells[answers_column][row], path, row, answers_column)
        item_id = str(cells[id_column][row]) if id_column else str(row)
        items.append(Item(item_id, images, question, answers))
    if not items:
        raise MimicError(f"table {path} has no rows; point path at a non-empty table")
    if id_column and len({item.id for item in items}) < len(items):
        raise MimicError(
            f"table {path}: column '{id_column}' has duplicate values; choose a unique id_column"
        )
    return items


def load_embedded(task: str, split: str, n: int, seed: int) -> list[Item]:
    """`n` items of one task of the embedded task suite (rendered in memory, deterministic given the seed)."""
    from pipeline.embedded import tasks  # imported here: only this source needs the renderer

    if task not in tasks.TASKS:
        raise MimicError(f"unknown embedded task '{task}'; use one of {', '.join(tasks.TASKS)}")
    if split not in tasks.SPLITS:
        raise MimicError(f"unknown embedded split '{split}'; use one of {', '.join(tasks.SPLITS)}")
    if n < 1:
        raise MimicError(f"embedded source asks for n={n} items; set n to at least 1")
    return [
        Item(e.id, (e.image,), e.question, tuple(e.answers)) for e in tasks.make_items(task, split, n, seed)
    ]


@dataclass(frozen=True)
class DataSource:
    """Where a dataset lives: `kind` picks the loader, the other fields are that loader's arguments.

    Fields left None are not passed, so the loader's defaults apply; a field the kind does not use is an error.
    """

    kind: str  # "vqa" | "okvqa" | "coco_karpathy" | "table" | "embedded"
    questions_json: Path | str | None = None  # vqa/okvqa: e.g. v2_OpenEnded_mscoco_val2014_questions.json
    annotations_json: Path | str | None = None  # vqa/okvqa: e.g. v2_mscoco_val2014_annotations.json
    image_dir: Path | str | None = None  # vqa/okvqa: the COCO image folder, e.g. coco/val2014
    image_pattern: str | None = None  # vqa/okvqa: default COCO_PATTERN
    karpathy_json: Path | str | None = None  # coco_karpathy: dataset_coco.json
    # coco_karpathy: the folder holding train2014/ val2014/; table: base of relative image paths
    image_root: Path | str | None = None
    split: str | None = None  # coco_karpathy: train|restval|val|test (default test); embedded: support|query
    path: Path | str | None = None  # table: .parquet/.arrow/.json/.jsonl/.csv file or save_to_disk folder
    image_column: str | None = None  # table: default "image"
    question_column: str | None = None  # table: default "question"; "" for captioning tables
    answers_column: str | None = None  # table: default "answers"
    id_column: str | None = None  # table: default row numbers
    task: str | None = None  # embedded: color|shape|size|position
    n: int | None = None  # embedded: number of items
    seed: int | None = None  # embedded: rendering seed
    metric: str | None = None  # table: exact_match (default), vqa_accuracy, okvqa_accuracy or cider_d


_LOADERS = {
    "vqa": load_vqa,
    "okvqa": load_vqa,
    "coco_karpathy": load_coco_karpathy,
    "table": load_table,
    "embedded": load_embedded,
}


def load_items(source: DataSource) -> list[Item]:
    """Load the items `source` describes, checking its fields against the loader's signature first."""
    if source.kind not in _LOADERS:
        raise MimicError(f"unknown data source kind '{source.kind}'; use one of {', '.join(_LOADERS)}")
    loader = _LOADERS[source.kind]
    params = inspect.signature(loader).parameters
    if source.metric is not None and source.kind != "table":
        raise MimicError(
            f"data source kind '{source.kind}': metric is for tables only ({source.kind} has its official metric)"
        )
    given = {f.name: getattr(source, f.name) for f in fields(source) if f.name not in ("kind", "metric")}
    given = {name: value for name, value in given.items() if value is not None}
    missing = [name for name, p in params.items() if p.default is p.empty and name not in given]
    unused = [name for name in given if name not in params]
    if missing or unused:
        raise MimicError(
            f"data source kind '{source.kind}': missing fields [{', '.join(missing)}], "
            f"unused fields [{', '.join(unused)}]; it takes {', '.join(params)}"
        )
    return loader(**given)


def split_support_query(
    items: Sequence[Item], n_support: int, n_query: int, seed: int
) -> tuple[list[Item], list[Item]]:
    """Draw disjoint support and query sets, reproducibly from `seed` (independent of global random state)."""
    if n_support < 0 or n_query < 0:
        raise MimicError(f"n_support={n_support} and n_query={n_query} must not be negative")
    if n_support + n_query > len(items):
        raise MimicError(
            f"split needs n_support + n_query = {n_support + n_query} items but the dataset has {len(items)}; "
            "lower n_support or n_query"
        )
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise MimicError(
                f"item id '{item.id}' occurs twice; ids must be unique (for tables set a unique id_column)"
            )
        seen.add(item.id)
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    support = [items[i] for i in order[:n_support]]
    query = [items[i] for i in order[n_support : n_support + n_query]]
    return support, query


def _read_json(path: Path, role: str) -> Any:
    if not path.is_file():
        raise MimicError(f"{role} not found: {path}")
    try:
        with path.open("rb") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MimicError(f"{role} {path} is not valid JSON ({one_line(exc)}); re-download or fix it") from exc


def _require_dir(path: Path, option: str, what: str) -> None:
    if not path.is_dir():
        raise MimicError(f"{option} not found: {path}; point it at {what}")


def _field(record: Any, key: str, path: Path, where: str) -> Any:
    """`record[key]`, or a one-line error naming the file, the record and the keys it does have."""
    if not isinstance(record, Mapping):
        raise MimicError(
            f"{path}: {where} should be a JSON object, found {type(record).__name__}; is this the right file?"
        )
    if key not in record:
        keys = ", ".join(map(str, record)) or "none"
        raise MimicError(f"{path}: {where} has no key '{key}' (keys: {keys}); is this the right file?")
    return record[key]


def _list_field(record: Any, key: str, path: Path, where: str) -> list:
    value = _field(record, key, path, where)
    if not isinstance(value, list):
        raise MimicError(f"{path}: '{key}' in {where} should be a list, found {type(value).__name__}")
    return value


def _image_name(pattern: str, subtype: str, image_id: Any) -> str:
    try:
        return pattern.format(subtype=subtype, image_id=image_id)
    except (KeyError, IndexError, ValueError) as exc:
        raise MimicError(
            f"image_pattern '{pattern}' does not fit image_id {image_id!r} ({one_line(exc)}); "
            "use the fields {subtype} and {image_id}"
        ) from exc


def _read_table(path: Path) -> Any:
    """The table as a `datasets.Dataset` (imported here: `datasets` is slow to import)."""
    import datasets

    if not path.exists():
        raise MimicError(f"table not found: {path}")
    if not path.is_dir() and path.suffix.lower() not in _TABLE_BUILDERS:
        raise MimicError(
            f"table {path} has an unsupported format; use one of {', '.join(_TABLE_BUILDERS)} or a save_to_disk folder"
        )
    try:
        if path.is_dir():
            dataset = datasets.load_from_disk(str(path))
        else:
            dataset = datasets.load_dataset(
                _TABLE_BUILDERS[path.suffix.lower()], data_files=str(path), split="train"
            )
    except Exception as exc:  # datasets and pyarrow raise many types for unreadable files
        while exc.__cause__ is not None:  # datasets wraps the reader's error in a generic one
            exc = exc.__cause__
        detail = f"{type(exc).__name__}: {' '.join(str(exc).split())}".rstrip(": ")
        raise MimicError(
            f"could not read table {path} ({detail}); check that it is a valid, non-empty table"
        ) from exc
    if not isinstance(dataset, datasets.Dataset):
        raise MimicError(
            f"{path} is a DatasetDict of splits {', '.join(dataset)}; point path at one split's folder"
        )
    return dataset


def _read_cells(dataset: Any, columns: list[str]) -> dict[str, list]:
    """Python values of `columns`; image cells stay undecoded (paths, bytes, {"bytes", "path"} dicts)."""
    import datasets

    raw = dataset.with_format("arrow")[:]
    cells = {}
    for name in columns:
        values = raw.column(name).to_pylist()
        feature = dataset.features[name]
        # An Image or a list of Images (List/Sequence hold their element in .feature); other columns
        # go through the features' decoder, which turns datasets' Json cells (mixed types) into values.
        is_image = isinstance(getattr(feature, "feature", feature), datasets.Image)
        cells[name] = values if is_image else dataset.features.decode_column(values, name)
    return cells


def _as_cells(cell: Any) -> list:
    return list(cell) if isinstance(cell, list) else [cell]


def _table_image(cell: Any, root: Path, table: Path, row: int, column: str) -> Path | Image.Image:
    """One image cell as a lazy path or a lazily decoded image; undecodable bytes fail here, by row."""
    if isinstance(cell, Mapping) and cell.get("bytes") is not None:
        cell = cell["bytes"]
    elif isinstance(cell, Mapping) and cell.get("path") is not None:
        cell = cell["path"]
    if isinstance(cell, str):
        return root / cell
    if isinstance(cell, bytes):
        try:
            return Image.open(io.BytesIO(cell))
        except _IMAGE_ERRORS as exc:
            raise MimicError(
                f"table {table}, row {row}: column '{column}' holds bytes that are no image ({one_line(exc)})"
            ) from exc
    raise MimicError(
        f"table {table}, row {row}: column '{column}' holds {type(cell).__name__}; expected a path, bytes or an Image dict"
    )


def _table_text(cell: Any, table: Path, row: int, column: str) -> str:
    if cell is None:
        raise MimicError(f"table {table}, row {row}: column '{column}' is empty; fill it or drop the row")
    return str(cell)


def _table_answers(cell: Any, table: Path, row: int, column: str) -> tuple[str, ...]:
    if isinstance(cell, str):
        return (cell,)
    if isinstance(cell, list):
        answers = [a.get("answer") if isinstance(a, Mapping) else a for a in cell]
        if all(isinstance(a, str) for a in answers):
            return tuple(answers)
    raise MimicError(
        f"table {table}, row {row}: column '{column}' should be a string or a list of strings, found {cell!r:.60}"
    )
