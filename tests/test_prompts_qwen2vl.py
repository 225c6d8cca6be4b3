"""Qwen2-VL prompts from token segments: teacher and student line up, and M-RoPE survives left-padded batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import IMAGE_TOKEN, build_tiny, word_level_tokenizer
from PIL import Image
from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor

from pipeline.families import ModelView, family_for
from pipeline.prompts import PromptTemplate, assemble, bos_segment, collate, encode_round

SPECIAL = [
    "<pad>",
    "<unk>",
    "<s>",
    "</s>",
    "<|endoftext|>",
    "<|image_pad|>",  # id 5 = the tiny model's image_token_id
    "<|video_pad|>",  # id 6 = video_token_id
    "<|vision_start|>",  # id 7 = vision_start_token_id
    "<|vision_end|>",
]
WORDS = ["\n", "question", ":", "short", "answer", "what", "is", "this", "?", "red", "blue", "green"]
MERGE = 2  # spatial_merge_size of the tiny model: MERGE**2 patches make one image token


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without its video processor, whose classes need torchvision."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)


def tiny_qwen2vl_processor() -> Qwen2VLProcessor:
    tokenizer = word_level_tokenizer(
        SPECIAL,
        WORDS,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    # patch 2 x merge 2: sides become multiples of 4; at most 128 pixels keep an image to 2..8 tokens
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=2, merge_size=MERGE, temporal_patch_size=2, min_pixels=16, max_pixels=128
    )
    return ImageOnlyQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)


def image(seed: int, height: int = 16, width: int = 16) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


DEMOS = [("what is this ?", "red"), ("what is this ?", "blue"), ("what is this ?", "green")]
SQUARE = ((16, 16),) * 3
# Images of the demonstrations in the M-RoPE tests: grids of 4x8, 8x8 and 8x4 patches give rounds of different
# lengths, and the 3D positions of each image (and of the text after it) depend on which grid belongs to it.
MIXED = ((8, 16), (16, 16), (16, 8))


def teacher_and_student(processor, family, k: int, sizes=SQUARE, query_seed: int = 9):
    template = PromptTemplate()
    demos = [
        encode_round(processor, family, template, q, [image(i, *size)], a)
        for i, ((q, a), size) in enumerate(zip(DEMOS[:k], sizes))
    ]
    query = encode_round(processor, family, template, "what is this ?", [image(query_seed)], "red")
    bos = bos_segment(processor)
    return assemble([bos, *demos, query], family), assemble([bos, query], family), query


def whole_prompt(processor, k: int, sizes=MIXED, query_seed: int = 9) -> dict[str, torch.Tensor]:
    """The teacher prompt of `k` demonstrations encoded by the processor in one call: an independent reference."""
    template, family = PromptTemplate(), family_for("qwen2_vl")
    rounds = [template.text(family, q, a) for q, a in DEMOS[:k]]
    rounds.append(template.text(family, "what is this ?", "red"))
    images = [image(i, *size) for i, size in zip(range(k), sizes)] + [image(query_seed)]
    text = processor.tokenizer.bos_token + "".join(rounds)
    return dict(processor(text=[text], images=images, add_special_tokens=False, return_tensors="pt"))


@pytest.fixture(scope="module")
def processor() -> Qwen2VLProcessor:
    return tiny_qwen2vl_processor()


@pytest.fixture(scope="module")
def model():
    return build_tiny("qwen2_vl")


def forward(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k != "answer_mask"}).logits


def test_query_answer_tokens_line_up_in_teacher_and_student(processor):
    family = family_for("qwen2_vl")
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == IMAGE_TOKEN
    teacher, student, query = teacher_and_student(processor, family, k=3)
    n = len(query.input_ids)
    assert len(teacher.input_ids) > len(student.input_ids) > n
    assert torch.equal(teacher.input_ids[-n:], student.input_ids[-n:])
    assert torch.equal(teacher.answer_mask[-n:], query.answer_mask)
    assert torch.equal(student.answer_mask[-n:], query.answer_mask)
    assert int(teacher.answer_mask.sum()) == 2 * 4 and int(student.answer_mask.sum()) == 2  # word and "\n"
    decoded = processor.tokenizer.decode(student.input_ids[student.answer_mask])
    assert decoded.replace(" ", "") == "red\n"
    for seq, n_images in ((teacher, 4), (student, 1)):
        grids = seq.images["image_grid_thw"]  # [images, 3]
        assert grids.shape == (n_images, 3)
        assert seq.images["pixel_values"].shape[0] == int(grids.prod(-1).sum())  # one row per patch
        image_tokens = int((seq.input_ids == IMAGE_TOKEN).sum())
        assert image_tokens == int(grids.prod(-1).sum()) // MERGE**2 and image_tokens > 0
    assert torch.equal(teacher.images["image_grid_thw"][-1], student.images["image_grid_thw"][0])


def test_assembled_sequence_equals_whole_prompt_encoding(processor, model):
    family = ModelView(model).family
    for k in (0, 3):
        teacher = teacher_and_student(processor, family, k, MIXED)[0]
        reference = whole_prompt(processor, k)
        assert torch.equal(teacher.input_ids, reference["input_ids"][0])
        assert torch.equal(teacher.images["image_grid_thw"], reference["image_grid_thw"])
        alone = forward(model, collate([teacher], family, pad_id=0))[0]
        assert (alone - forward(model, reference)[0]).abs().max() <= 1e-4


def test_left_padded_batch_equals_single_forwards(processor, model):
    family = ModelView(model).family
    sequences = [teacher_and_student(processor, family, k, MIXED)[0] for k in (0, 2, 3)]
    batch = collate(sequences, family, pad_id=0)
    assert batch["image_grid_thw"].shape == (1 + 3 + 4, 3)  # every image of the batch, in row order
    assert batch["attention_mask"].sum(1).tolist() == [len(s.input_ids) for s in sequences]
    logits = forward(model, batch)
    for row, seq in enumerate(sequences):
        alone = forward(model, collate([seq], family, pad_id=0))[0]
        assert (logits[row, -len(seq.input_ids) :] - alone).abs().max() <= 1e-4
