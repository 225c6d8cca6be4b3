"""The tiny real-class checkpoints behave like users' checkpoints: BPE tokenization, save/load, image sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image
from real_checkpoints import (
    ANSWERS,
    FAMILY_NAMES,
    IMAGE_SIZES,
    SPECS,
    build_model,
    fixture_image,
    load_model,
    load_processor,
    processor_for,
    processor_inputs,
    save_tiny_checkpoint,
    write_vqa_fixture,
)

from pipeline.data import DataSource, load_image, load_items, load_vqa

ROUND = "Question: what color is it? Short answer: red\n"
PREFIX, ANSWER = "Question: what color is it? Short answer: ", "red\n"
KINDS = {"bpe": "qwen2_vl", "metaspace": "idefics2"}  # a family of each tokenizer kind


@pytest.mark.parametrize("kind", list(KINDS))
def test_prefix_and_answer_apart_differ_from_one_call(kind):
    tokenizer = processor_for(KINDS[kind]).tokenizer
    spec = SPECS[KINDS[kind]]
    assert spec.tokenizer_kind == kind

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    whole, apart = ids(ROUND), ids(PREFIX) + ids(ANSWER)
    assert whole != apart and len(apart) > len(whole)
    tokens = tokenizer.convert_ids_to_tokens(whole)
    assert tokens[-1] == spec.newline and "\n" not in tokenizer.get_vocab()
    assert tokens[-2] == {"bpe": "Ġred", "metaspace": "▁red"}[kind]  # common words are single tokens
    assert tokenizer.convert_ids_to_tokens(ids("\n"))[-1] == spec.newline
    assert tokenizer.decode(whole) == ROUND


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: save_tiny_checkpoint(name, root / name) for name in FAMILY_NAMES}


def prompt(image: Image.Image, question: str = "what color is it?") -> list:
    return [image, f"Question: {question} Short answer:"]


def logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_saved_checkpoint_loads_back_identically(name, checkpoints):
    directory = checkpoints[name]
    processor, model = load_processor(name, directory), load_model(directory)
    original = processor_for(name)
    assert type(processor).__name__ == type(original).__name__
    kind = SPECS[name].tokenizer_kind
    assert type(original.tokenizer).__name__ == {"bpe": "Qwen2Tokenizer", "metaspace": "LlamaTokenizer"}[kind]
    assert type(processor.image_processor) is type(original.image_processor)
    image = fixture_image("red", 2, IMAGE_SIZES[0])
    inputs = processor_inputs(name, processor, [prompt(image)])
    expected = processor_inputs(name, original, [prompt(image)])
    assert inputs.keys() == expected.keys()
    assert all(torch.equal(inputs[k], expected[k]) for k in inputs)
    assert torch.equal(logits(model, inputs), logits(build_model(name, original), inputs))
    generation = model.generation_config
    assert generation.pad_token_id == processor.tokenizer.pad_token_id is not None
    assert generation.eos_token_id is not None
    assert generation.to_dict() == build_model(name, original).generation_config.to_dict()
    alphas = [p for key, p in model.named_parameters() if "alpha" in key]
    assert len(alphas) == (4 if name == "idefics" else 0)  # 2 gated cross-attention layers of 4
    assert all(p.abs().min() > 0 for p in alphas)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_auto_processor_fails_only_where_documented(name, checkpoints):
    if SPECS[name].auto_processor_loads:
        transformers.AutoProcessor.from_pretrained(checkpoints[name], local_files_only=True)
    else:
        with pytest.raises(ImportError, match="Torchvision"):
            transformers.AutoProcessor.from_pretrained(checkpoints[name], local_files_only=True)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_images_of_different_sizes_in_one_call(name):
    processor = processor_for(name)
    model = build_model(name, processor)
    wide, tall, square = (fixture_image("blue", 1, size) for size in IMAGE_SIZES[:3])
    two_images = [[wide, "Question: what? Short answer: red\n", *prompt(tall)]]  # one prompt, two images
    batch = [prompt(wide), [square, "Is it red?"]]  # two prompts, one image each
    for prompts, images in ((two_images, [wide, tall]), (batch, [wide, square])):
        inputs = processor_inputs(name, processor, prompts)
        out = logits(model, inputs)
        assert out.shape[:2] == inputs["input_ids"].shape and torch.isfinite(out).all()
        pixels, per_prompt = inputs["pixel_values"], max(len(p) for p in prompts) // 2
        if name == "idefics":  # [B, images, 3, H, W] at the fixed size, mask [B, T, images]
            assert pixels.shape == (len(prompts), per_prompt, 3, 16, 16)
            assert inputs["image_attention_mask"].shape[-1] == per_prompt
        elif name == "idefics2":  # padded to the largest H and W, pixel_attention_mask marks real pixels
            assert pixels.shape[:2] == (len(prompts), per_prompt)
            masks = [m for m in inputs["pixel_attention_mask"].flatten(0, 1) if m.any()]
            assert len({(int(m.any(1).sum()), int(m.any(0).sum())) for m in masks}) == 2
        elif name == "llava_onevision":  # [images, patches, 3, H, W] and the original (height, width)
            assert pixels.shape[0] == 2 and inputs["image_sizes"].tolist() == [
                [i.height, i.width] for i in images
            ]
            assert (pixels.shape[1] == 1) == (per_prompt > 1)  # several images in a prompt: no anyres patches
        elif name == "llava":  # centre-cropped to a fixed size
            assert pixels.shape == (2, 3, 16, 16)
        else:  # flat patch rows, one grid per image: sizes give different grids
            grids = inputs["image_grid_thw"]
            assert grids.shape == (2, 3) and pixels.shape[0] == int(grids.prod(-1).sum())
            assert grids[0].tolist() != grids[1].tolist()


def test_onevision_anyres_patches_depend_on_the_image_size():
    processor = processor_for("llava_onevision")
    counts = {
        size: processor_inputs("llava_onevision", processor, [prompt(fixture_image("red", 1, size))])[
            "pixel_values"
        ].shape[1]
        for size in IMAGE_SIZES
    }
    assert len(set(counts.values())) >= 3


def test_idefics2_keeps_the_aspect_ratio():
    processor = processor_for("idefics2")
    shapes = {
        processor_inputs("idefics2", processor, [prompt(fixture_image("red", 1, size))])[
            "pixel_values"
        ].shape[-2:]
        for size in IMAGE_SIZES
    }
    assert len(shapes) == len(IMAGE_SIZES)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_images_change_the_logits(name):
    processor = processor_for(name)
    model = build_model(name, processor)
    red, blue = (
        processor_inputs(name, processor, [prompt(fixture_image(c, 1, (32, 32)))]) for c in ("red", "blue")
    )
    assert torch.equal(red["input_ids"], blue["input_ids"])
    assert (logits(model, red)[0, -1] - logits(model, blue)[0, -1]).abs().max() > 1e-3


def test_vqa_fixture_loads_with_the_library_loader(tmp_path):
    source = write_vqa_fixture(tmp_path, n_questions=24)
    paths = {k: v for k, v in source.items() if k != "kind"}
    items = load_vqa(**paths)
    assert len(items) == 24 and len({item.id for item in items}) == 24
    assert load_items(DataSource(**source)) == items
    images = {item.images[0]: load_image(item.images[0]) for item in items}
    assert len(images) < len(items)  # several questions per image
    sizes = {image.size for image in images.values()}
    assert len(sizes) >= 3 and len({round(w / h, 3) for w, h in sizes}) >= 3
    lengths = [len(item.question.split()) for item in items]
    assert min(lengths) <= 4 and max(lengths) >= 9 and max(lengths) <= 12
    assert all(len(item.answers) == 10 and set(item.answers) <= set(ANSWERS) for item in items)
    assert len({item.answers[0] for item in items}) >= 3
