"""Prompts from token segments: teacher and student share the query+answer tokens; batches pad correctly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_tiny, word_level_tokenizer
from PIL import Image
from transformers import Idefics2ImageProcessorPil, Idefics2Processor

from pipeline.embedded.model import build_processor
from pipeline.errors import MimicError
from pipeline.families import ModelView, family_for
from pipeline.prompts import PromptBuilder, PromptTemplate, assemble, bos_segment, collate, encode_round

SPECIAL = [
    "<pad>",
    "<unk>",
    "<s>",
    "<fake_token_around_image>",
    "<end_of_utterance>",
    "<image>",
]  # <image> = id 5
WORDS = ["\n", "question", ":", "short", "answer", "what", "is", "this", "?", "red", "blue", "green"]


def tiny_idefics2_processor() -> Idefics2Processor:
    tokenizer = word_level_tokenizer(
        SPECIAL,
        WORDS,
        bos_token="<s>",
        pad_token="<pad>",
        extra_special_tokens={
            "image_token": "<image>",
            "image_boundary_token": "<fake_token_around_image>",
            "end_of_utterance_token": "<end_of_utterance>",
        },
    )
    image_processor = Idefics2ImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": 16, "shortest_edge": 16}
    )
    return Idefics2Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4)


def image(seed: int, size: int = 16) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


DEMOS = [("what is this ?", "red"), ("what is this ?", "blue"), ("what is this ?", "green")]


def teacher_and_student(processor, family, k: int, query_seed: int = 9):
    template = PromptTemplate()
    demos = [
        encode_round(processor, family, template, q, [image(i)], a) for i, (q, a) in enumerate(DEMOS[:k])
    ]
    query = encode_round(processor, family, template, "what is this ?", [image(query_seed)], "red")
    bos = bos_segment(processor)
    return assemble([bos, *demos, query], family), assemble([bos, query], family), query


@pytest.mark.parametrize("name", ["llava", "idefics2"])
def test_query_answer_tokens_line_up_in_teacher_and_student(name):
    processor = build_processor() if name == "llava" else tiny_idefics2_processor()
    family = family_for(name)
    teacher, student, query = teacher_and_student(processor, family, k=3)
    n = len(query.input_ids)
    assert torch.equal(teacher.input_ids[-n:], student.input_ids[-n:])
    assert torch.equal(teacher.answer_mask[-n:], query.answer_mask) and torch.equal(
        student.answer_mask[-n:], query.answer_mask
    )
    assert student.answer_mask.sum() == 2  # "red" and "\n"
    decoded = processor.tokenizer.decode(student.input_ids[student.answer_mask])
    assert decoded.replace(" ", "") == "red\n"
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    images = teacher.images["pixel_values"]
    assert images.shape[family.image_axis] == 4  # three demonstrations and the query
    per_image = int((teacher.input_ids == image_token).sum()) // 4
    assert per_image * 4 == int((teacher.input_ids == image_token).sum()) and per_image > 0


def test_left_padded_batch_equals_single_forwards():
    model = build_tiny("idefics2")
    processor = tiny_idefics2_processor()
    family = ModelView(model).family
    sequences = [teacher_and_student(processor, family, k)[0] for k in (0, 2, 3)]
    batch = collate(sequences, family, pad_id=0)
    assert batch["pixel_values"].shape[:2] == (3, 4)  # padded to the most images
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "answer_mask"}).logits
        for row, seq in enumerate(sequences):
            single = collate([seq], family, pad_id=0)
            alone = model(**{k: v for k, v in single.items() if k != "answer_mask"}).logits[0]
            assert (logits[row, -len(seq.input_ids) :] - alone).abs().max() <= 1e-4


def test_bad_templates_and_lengths_are_refused():
    with pytest.raises(MimicError, match="lacks the field"):
        PromptTemplate(round="{question} {answer}")
    processor = build_processor()
    teacher, _, _ = teacher_and_student(processor, family_for("llava"), k=3)
    with pytest.raises(MimicError, match="exceeds the model's limit"):
        assemble([teacher], family_for("llava"), max_length=10)


def test_builder_keeps_tokens_of_every_round_but_images_of_the_latest_only():
    from pipeline.data import load_embedded

    items = load_embedded("color", "support", 6, 0)
    processor = build_processor()
    bounded = PromptBuilder(processor, family_for("llava"), PromptTemplate(), image_cache=2)
    unbounded = PromptBuilder(processor, family_for("llava"), PromptTemplate(), image_cache=0)
    first = [bounded.round(item) for item in items]
    assert len(bounded._images) == 2 and len(bounded._tokens) == 6
    for item, was in zip(items, first):  # evicted rounds are encoded again, to the same tensors
        again, fresh = bounded.round(item), unbounded.round(item)
        assert torch.equal(again.input_ids, was.input_ids) and torch.equal(again.answer_mask, was.answer_mask)
        assert torch.equal(again.images["pixel_values"], fresh.images["pixel_values"])
        assert bounded.tokens(item).images == {}
    assert len(unbounded._images) == 0


def test_idefics_image_attention_mask_equals_the_processors_rule():
    """Vectorised mask vs the processor's token-by-token rule: the latest image at or before each token, none
    before the first image, none after an EOS until the next image."""
    from pipeline.prompts import image_attention_mask

    def by_hand(ids, image, eos, n):
        out = torch.zeros(*ids.shape, n, dtype=torch.long)
        for b, row in enumerate(ids.tolist()):
            count, blind = -1, False
            for t, token in enumerate(row):
                if token == image:
                    count, blind = count + 1, False
                if count >= 0 and not blind:
                    out[b, t, count] = 1
                blind = blind or token == eos
        return out

    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        ids = torch.randint(0, 5, (3, 30), generator=g)  # 3 = image, 2 = EOS
        n = int((ids == 3).sum(1).max().clamp_min(1))
        assert torch.equal(image_attention_mask(ids, 3, n, 2), by_hand(ids, 3, 2, n))
