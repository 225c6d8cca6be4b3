"""Loaders read official layouts and tables from tmp_path; every user error is one line naming its file."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data import (
    DataSource,
    Item,
    load_coco_karpathy,
    load_embedded,
    load_image,
    load_items,
    load_table,
    load_vqa,
    split_support_query,
)
from pipeline.errors import MimicError

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _jpeg_bytes(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def _write_jpeg(path: Path, color: tuple[int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_jpeg_bytes(color))
    return path


def _centre(image: Image.Image) -> tuple[int, ...]:
    return image.getpixel((4, 4))


def _close(pixel: tuple[int, ...], color: tuple[int, int, int]) -> bool:
    return all(abs(a - b) < 20 for a, b in zip(pixel, color, strict=True))


def _one_line_error(excinfo: pytest.ExceptionInfo, *parts: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)
    return message


# Official VQAv2 / OK-VQA layout: 3 questions on 2 COCO images, 10 human answers each.
ANSWERS = {
    420: ["red"] * 7 + ["maroon", "red", "orange"],
    421: ["2", "2", "two", "2", "3", "2", "2", "2", "2", "2"],
    70: ["yes"] * 10,
}
QUESTIONS = [(420, 42, "What color is the bus?"), (421, 42, "How many people?"), (70, 7, "Is it sunny?")]


@pytest.fixture
def vqa(tmp_path: Path) -> dict[str, Path]:
    image_dir = tmp_path / "val2014"
    _write_jpeg(image_dir / "COCO_val2014_000000000042.jpg", RED)
    _write_jpeg(image_dir / "COCO_val2014_000000000007.jpg", GREEN)
    questions = {
        "info": {"description": "fixture"},
        "license": {"name": "CC"},
        "data_subtype": "val2014",
        "questions": [{"image_id": i, "question": q, "question_id": qid} for qid, i, q in QUESTIONS],
    }
    annotations = {
        "annotations": [
            {
                "question_id": qid,
                "image_id": i,
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": n + 1}
                    for n, a in enumerate(ANSWERS[qid])
                ],
                "multiple_choice_answer": ANSWERS[qid][0],
                "question_type": "what",
                "answer_type": "other",
            }
            for qid, i, _ in reversed(QUESTIONS)  # annotation order differs from question order
        ]
    }
    paths = {"questions": tmp_path / "q.json", "annotations": tmp_path / "a.json", "images": image_dir}
    paths["questions"].write_text(json.dumps(questions))
    paths["annotations"].write_text(json.dumps(annotations))
    return paths


def test_load_vqa_reads_official_layout(vqa):
    items = load_vqa(vqa["questions"], vqa["annotations"], vqa["images"])
    expected = [
        Item(str(qid), (vqa["images"] / f"COCO_val2014_{i:012d}.jpg",), q, tuple(ANSWERS[qid]))
        for qid, i, q in QUESTIONS
    ]
    assert items == expected
    assert (
        len(items[1].answers) == 10 and items[1].answers.count("2") == 8
    )  # duplicates kept for the VQA metric
    image = load_image(items[2].images[0])
    assert image.mode == "RGB" and _close(_centre(image), GREEN)


@pytest.mark.parametrize("kind", ["vqa", "okvqa"])
def test_dispatcher_reads_vqa_and_okvqa(vqa, kind):
    source = DataSource(
        kind,
        questions_json=vqa["questions"],
        annotations_json=vqa["annotations"],
        image_dir=str(vqa["images"]),
    )
    assert load_items(source) == load_vqa(vqa["questions"], vqa["annotations"], vqa["images"])


def test_load_vqa_custom_image_pattern(vqa):
    (vqa["images"] / "42.png").touch()
    items = load_vqa(vqa["questions"], vqa["annotations"], vqa["images"], image_pattern="{image_id}.png")
    assert items[0].images == (vqa["images"] / "42.png",)


@pytest.fixture
def karpathy(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "coco"
    records = [
        ("val2014", "COCO_val2014_000000000001.jpg", 1, "test", ["A red bus.", "A bus on a road. "]),
        ("val2014", "COCO_val2014_000000000002.jpg", 2, "restval", ["A dog."]),
        ("train2014", "COCO_train2014_000000000003.jpg", 3, "train", ["A cat.", "Cat.", "A cat sleeps."]),
        ("val2014", "COCO_val2014_000000000004.jpg", 4, "test", ["Sky."]),
    ]
    for n, (folder, name, *_) in enumerate(records):
        _write_jpeg(root / folder / name, (RED, GREEN, BLUE, RED)[n])
    doc = {
        "images": [
            {
                "filepath": folder,
                "filename": name,
                "imgid": n,
                "split": split,
                "sentences": [{"raw": raw, "tokens": raw.lower().split(), "imgid": n} for raw in captions],
                "cocoid": cocoid,
            }
            for n, (folder, name, cocoid, split, captions) in enumerate(records)
        ],
        "dataset": "coco",
    }
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(doc))
    return {"json": path, "root": root}


def test_load_coco_karpathy_splits(karpathy):
    root = karpathy["root"]
    test = load_coco_karpathy(karpathy["json"], root)
    assert test == [
        Item("1", (root / "val2014/COCO_val2014_000000000001.jpg",), "", ("A red bus.", "A bus on a road. ")),
        Item("4", (root / "val2014/COCO_val2014_000000000004.jpg",), "", ("Sky.",)),
    ]
    train = load_items(
        DataSource("coco_karpathy", karpathy_json=karpathy["json"], image_root=root, split="train")
    )
    assert [item.id for item in train] == ["2", "3"]  # restval belongs to train
    assert _close(_centre(load_image(train[1].images[0])), BLUE)


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the arrow cache `datasets` writes for local files inside tmp_path."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def test_load_table_parquet_with_image_feature(tmp_path, hf_cache):
    features = datasets.Features(
        {
            "qid": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answers": datasets.List(datasets.Value("string")),
        }
    )
    rows = {
        "qid": ["a", "b"],
        "image": [Image.open(io.BytesIO(_jpeg_bytes(RED))), Image.open(io.BytesIO(_jpeg_bytes(BLUE)))],
        "question": ["What?", "Why?"],
        "answers": [["x", "x", "y"], ["z"]],
    }
    path = tmp_path / "t.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    items = load_table(path, id_column="qid")
    assert [(i.id, i.question, i.answers) for i in items] == [
        ("a", "What?", ("x", "x", "y")),
        ("b", "Why?", ("z",)),
    ]
    assert _close(_centre(load_image(items[0].images[0])), RED)
    assert _close(_centre(load_image(items[1].images[0])), BLUE)


def test_load_table_jsonl_paths_and_renamed_columns(tmp_path, hf_cache):
    _write_jpeg(tmp_path / "imgs" / "a.jpg", GREEN)
    _write_jpeg(tmp_path / "imgs" / "b.jpg", RED)
    rows = [
        {"img": "imgs/a.jpg", "q": "Q1", "ans": "one"},
        {"img": ["imgs/a.jpg", "imgs/b.jpg"], "q": "Q2", "ans": ["two", "2"]},
    ]
    path = tmp_path / "sub" / "t.jsonl"
    path.parent.mkdir()
    path.write_text(
        "\n".join(json.dumps(row) for row in rows)
    )  # mixed cell types: datasets reads them as Json
    source = DataSource(
        "table", path=path, image_column="img", question_column="q", answers_column="ans", image_root=tmp_path
    )
    items = load_items(source)
    assert items == [
        Item("0", (tmp_path / "imgs/a.jpg",), "Q1", ("one",)),
        Item("1", (tmp_path / "imgs/a.jpg", tmp_path / "imgs/b.jpg"), "Q2", ("two", "2")),
    ]


def test_load_table_paths_default_to_table_folder_and_vqa_answer_dicts(tmp_path, hf_cache):
    _write_jpeg(tmp_path / "a.jpg", GREEN)
    answers = [
        {"answer": "yes", "answer_confidence": "yes", "answer_id": 1},
        {"answer": "no", "answer_confidence": "maybe", "answer_id": 2},
    ]
    table = pa.table({"image": ["a.jpg"], "answers": [answers]})
    pq.write_table(table, tmp_path / "t.parquet")
    (item,) = load_table(tmp_path / "t.parquet", question_column="")
    assert item == Item("0", (tmp_path / "a.jpg",), "", ("yes", "no"))


def test_load_table_raw_bytes_and_save_to_disk_folder(tmp_path, hf_cache):
    folder = tmp_path / "saved"
    rows = {"image": [_jpeg_bytes(BLUE)], "question": ["Q"], "answers": ["A"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(folder))
    (item,) = load_table(folder)
    assert (item.question, item.answers) == ("Q", ("A",))
    assert _close(_centre(load_image(item.images[0])), BLUE)


def test_load_embedded_converts_task_items():
    tasks = pytest.importorskip("pipeline.embedded.tasks")
    items = load_embedded("color", "support", 3, seed=5)
    reference = tasks.make_items("color", "support", 3, 5)
    assert [(i.id, i.question, i.answers) for i in items] == [
        (r.id, r.question, r.answers) for r in reference
    ]
    assert list(load_image(items[0].images[0]).getdata()) == list(reference[0].image.convert("RGB").getdata())
    source = DataSource("embedded", task="color", split="support", n=3, seed=5)
    assert [i.id for i in load_items(source)] == [r.id for r in reference]


def test_missing_image_and_corrupt_image_name_the_file(tmp_path):
    missing = tmp_path / "COCO_val2014_000000000099.jpg"
    with pytest.raises(MimicError) as excinfo:
        load_image(missing)
    _one_line_error(excinfo, "image not found", str(missing))
    corrupt = tmp_path / "COCO_val2014_000000000013.jpg"
    corrupt.write_bytes(b"\x00garbage, not a jpeg\nsecond line")
    with pytest.raises(MimicError) as excinfo:
        load_image(corrupt)
    _one_line_error(excinfo, "corrupt", str(corrupt))
    truncated = tmp_path / "COCO_val2014_000000000014.jpg"
    truncated.write_bytes(_jpeg_bytes(RED)[:200])
    with pytest.raises(MimicError) as excinfo:
        load_image(truncated)
    _one_line_error(excinfo, "corrupt", str(truncated))


def _edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def test_vqa_file_errors(vqa, tmp_path):
    q, a, images = vqa["questions"], vqa["annotations"], vqa["images"]
    with pytest.raises(MimicError) as excinfo:
        load_vqa(tmp_path / "nope.json", a, images)
    _one_line_error(excinfo, f"questions file not found: {tmp_path / 'nope.json'}")
    with pytest.raises(MimicError) as excinfo:
        load_vqa(q, tmp_path / "nope.json", images)
    _one_line_error(excinfo, f"annotations file not found: {tmp_path / 'nope.json'}")
    with pytest.raises(MimicError) as excinfo:
        load_vqa(q, a, tmp_path / "no_images")
    _one_line_error(excinfo, "image_dir not found", str(tmp_path / "no_images"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"questions": [\n{"image_id": 1,,}')
    with pytest.raises(MimicError) as excinfo:
        load_vqa(bad, a, images)
    _one_line_error(excinfo, str(bad), "not valid JSON")


def test_vqa_missing_keys_list_the_available_ones(vqa):
    q, a, images = vqa["questions"], vqa["annotations"], vqa["images"]
    _edit_json(q, lambda doc: doc.pop("questions"))
    with pytest.raises(MimicError) as excinfo:
        load_vqa(q, a, images)
    _one_line_error(excinfo, str(q), "'questions'", "info, license, data_subtype")


def test_vqa_annotation_without_answers(vqa):
    q, a, images = vqa["questions"], vqa["annotations"], vqa["images"]
    _edit_json(a, lambda doc: doc["annotations"][1].pop("answers"))
    with pytest.raises(MimicError) as excinfo:
        load_vqa(q, a, images)
    _one_line_error(excinfo, str(a), "annotations[1]", "'answers'", "multiple_choice_answer")


def test_vqa_question_without_annotation(vqa):
    q, a, images = vqa["questions"], vqa["annotations"], vqa["images"]
    _edit_json(a, lambda doc: doc["annotations"].pop(0))  # drops question 70's annotation
    with pytest.raises(MimicError) as excinfo:
        load_vqa(q, a, images)
    _one_line_error(excinfo, str(q), str(a), "question_id 70 has no annotation")


def test_vqa_empty_questions(vqa):
    _edit_json(vqa["questions"], lambda doc: doc.update(questions=[]))
    with pytest.raises(MimicError) as excinfo:
        load_vqa(vqa["questions"], vqa["annotations"], vqa["images"])
    _one_line_error(excinfo, str(vqa["questions"]), "no questions")


def test_karpathy_errors(karpathy):
    path, root = karpathy["json"], karpathy["root"]
    with pytest.raises(MimicError) as excinfo:
        load_coco_karpathy(path, root, split="testing")
    _one_line_error(excinfo, "'testing'", "train, restval, val, test")
    _edit_json(path, lambda doc: [r.update(split="train") for r in doc["images"]])
    with pytest.raises(MimicError) as excinfo:
        load_coco_karpathy(path, root, split="val")
    _one_line_error(excinfo, str(path), "no images in split 'val'")
    _edit_json(path, lambda doc: doc["images"][2].pop("sentences"))
    with pytest.raises(MimicError) as excinfo:
        load_coco_karpathy(path, root, split="train")
    _one_line_error(excinfo, str(path), "images[2]", "'sentences'", "filepath")


def test_table_errors(tmp_path, hf_cache):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"img": ["a.jpg"], "question": ["Q"], "answer": ["A"]}), path)
    with pytest.raises(MimicError) as excinfo:
        load_table(path)
    _one_line_error(excinfo, str(path), "'image'", "'answers'", "columns: img, question, answer")
    with pytest.raises(MimicError) as excinfo:
        load_table(tmp_path / "missing.parquet")
    _one_line_error(excinfo, "table not found", str(tmp_path / "missing.parquet"))
    odd = tmp_path / "t.xlsx"
    odd.write_text("x")
    with pytest.raises(MimicError) as excinfo:
        load_table(odd)
    _one_line_error(excinfo, str(odd), "unsupported format", ".parquet")
    garbage = tmp_path / "g.parquet"
    pq.write_table(pa.table({"image": [b"not an image"], "question": ["Q"], "answers": ["A"]}), garbage)
    with pytest.raises(MimicError) as excinfo:
        load_table(garbage)
    _one_line_error(excinfo, str(garbage), "row 0", "'image'")
    for name, header in [
        ("e.csv", "image,question,answers\n"),
        ("e.jsonl", ""),
    ]:  # datasets cannot read empty tables
        empty = tmp_path / name
        empty.write_text(header)
        with pytest.raises(MimicError) as excinfo:
            load_table(empty)
        _one_line_error(excinfo, f"could not read table {empty}", "non-empty")


def test_dispatcher_errors(vqa):
    with pytest.raises(MimicError) as excinfo:
        load_items(DataSource("coco"))
    _one_line_error(excinfo, "'coco'", "vqa, okvqa, coco_karpathy, table, embedded")
    with pytest.raises(MimicError) as excinfo:
        load_items(DataSource("vqa", questions_json=vqa["questions"], image_root=vqa["images"]))
    _one_line_error(excinfo, "annotations_json, image_dir", "unused fields [image_root]")


ITEMS = [Item(f"id{n}", (), f"q{n}", (str(n),)) for n in range(20)]


def test_split_support_query_is_disjoint_and_reproducible():
    support, query = split_support_query(ITEMS, 12, 5, seed=3)
    assert (len(support), len(query)) == (12, 5)
    assert not {i.id for i in support} & {i.id for i in query}
    assert (support, query) == split_support_query(ITEMS, 12, 5, seed=3)
    assert (support, query) != split_support_query(ITEMS, 12, 5, seed=4)
    everything, none = split_support_query(ITEMS, 20, 0, seed=0)
    assert sorted(i.id for i in everything) == sorted(i.id for i in ITEMS) and none == []


def test_split_support_query_errors():
    with pytest.raises(MimicError) as excinfo:
        split_support_query(ITEMS, 15, 6, seed=0)
    _one_line_error(excinfo, "21", "has 20", "n_support")
    with pytest.raises(MimicError) as excinfo:
        split_support_query([*ITEMS, ITEMS[0]], 2, 2, seed=0)
    _one_line_error(excinfo, "'id0'", "unique")


def test_one_source_evaluation_queries_do_not_move_with_the_training_sizes():
    # data.eval == data.train: a sweep over n_train or n_val must score the same evaluation queries
    from conftest import ROOT

    from pipeline.config import load_params
    from pipeline.splits import make_splits

    source = "{kind: embedded, task: color, split: support, n: 80, seed: 0}"

    def splits(n_train: int, n_val: int):
        sizes = [f"data.n_train={n_train}", f"data.n_val={n_val}", "data.n_eval=20", "data.n_support=20"]
        params = load_params(ROOT / "params.yaml", [f"data.train={source}", f"data.eval={source}", *sizes])
        return make_splits(params.data)

    small, large, with_val = splits(8, 0), splits(16, 0), splits(8, 12)
    assert [i.id for i in small.eval] == [i.id for i in large.eval] == [i.id for i in with_val.eval]
    assert [i.id for i in large.train[:8]] == [i.id for i in small.train] == [i.id for i in with_val.train]
    for s in (small, large, with_val):
        ids = [[i.id for i in part] for part in (s.support, s.train, s.eval, s.val)]
        assert len({x for part in ids for x in part}) == sum(map(len, ids))  # disjoint
    with pytest.raises(
        MimicError, match=r"data.train has 80 items, but data.n_support \+ n_train \+ n_val \+ n_eval"
    ):
        splits(40, 10)


@pytest.mark.parametrize(
    "source, message",
    [
        (
            "{kind: embedded, task: color, split: support, n: abc, seed: 0}",
            "data.train.n must be a whole number, got 'abc'",
        ),
        (
            "{kind: embedded, task: color, split: support, n: 64, seed: 1.5}",
            "data.train.seed must be a whole number",
        ),
        (
            "{kind: vqa, questions_json: 5, annotations_json: a.json, image_dir: x}",
            "data.train.questions_json must be a path, got 5",
        ),
        (
            "{kind: vqa, questions_json: q.json, annotations_json: a.json, image_dir: x, image_pattern: 7}",
            "data.train.image_pattern must be text",
        ),
        (
            "{kind: embedded, task: color, nn: 3}",
            r"data.train: unknown keys \['nn'\]; its keys are kind, questions_json",
        ),
        ("{task: color}", "data.train: missing key 'kind'"),
        ("[1, 2]", "data.train must be dict, got \\[1, 2\\]"),
    ],
)
def test_a_data_source_field_of_the_wrong_type_is_one_line_naming_it(source, message):
    from conftest import ROOT

    from pipeline.config import load_params
    from pipeline.splits import make_splits

    with pytest.raises(MimicError, match=message) as excinfo:
        make_splits(load_params(ROOT / "params.yaml", [f"data.train={source}"]).data)
    assert "\n" not in str(excinfo.value)


def test_data_paths_may_start_with_the_home_folder(tmp_path, monkeypatch):
    from pipeline.splits import data_source

    monkeypatch.setenv("HOME", str(tmp_path))
    source = data_source({"kind": "vqa", "questions_json": "~/q.json", "image_dir": "~/images"}, "data.eval")
    assert source.questions_json == str(tmp_path / "q.json") and source.image_dir == str(tmp_path / "images")


def test_a_table_image_decoded_by_several_threads_at_once_gives_its_pixels():
    # a table's image bytes are decoded lazily by PIL, which is not thread-safe: prompts built by worker threads
    # (data.workers) may decode one item's image at the same moment
    import io
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from PIL import Image

    from pipeline.data import load_image

    noise = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)  # slow to decode
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG", quality=90)
    expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    with ThreadPoolExecutor(2) as pool:
        for _ in range(30):
            lazy = Image.open(io.BytesIO(buffer.getvalue()))  # as pipeline.data._table_image returns it
            decoded = list(pool.map(lambda _, image=lazy: np.asarray(load_image(image)), range(2)))
            assert all(np.array_equal(d, expected) for d in decoded)


def test_a_table_named_twice_with_a_metric_or_another_spelling_of_its_path_is_one_source(
    tmp_path, monkeypatch
):
    import json

    from conftest import ROOT

    from pipeline.config import load_params
    from pipeline.splits import make_splits

    rows = [{"id": f"r{i}", "image": "a.png", "question": "what?", "answers": ["red"]} for i in range(30)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("HOME", str(tmp_path))
    sizes = ["data.n_train=8", "data.n_val=0", "data.n_eval=10", "data.n_support=10"]
    plain = f"{{kind: table, path: {tmp_path / 't.jsonl'}}}"
    other = "{kind: table, path: ~/t.jsonl, metric: vqa_accuracy}"

    def splits(eval_source):
        settings = [f"data.train={plain}", f"data.eval={eval_source}", *sizes]
        return make_splits(load_params(ROOT / "params.yaml", settings).data)

    one, same = splits(plain), splits(other)
    assert [i.id for i in same.eval] == [i.id for i in one.eval] and len(one.eval) == 10
    with pytest.raises(MimicError, match="data.eval.metric: only a table takes a metric"):
        splits("{kind: embedded, task: color, split: query, n: 8, seed: 0, metric: cider_d}")
