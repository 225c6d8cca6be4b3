"""Every family with real tokenizer classes (byte-level BPE, Metaspace) and real processors, images of different
sizes: segment-assembled prompts equal one processor call, left-padded batches equal their rows alone with the
shift on (student, teacher, generation), generation stops at the newline."""

from __future__ import annotations

import functools

import pytest
import torch
from real_checkpoints import (
    FAMILY_NAMES,
    IMAGE_SIZES,
    QUESTIONS,
    SPECS,
    build_model,
    fixture_image,
    processor_for,
)

from pipeline.data import Item
from pipeline.evaluation import generate_answers, newline_tokens
from pipeline.families import ModelView
from pipeline.methods.mimic import MimicShift, attach, spec_for
from pipeline.prompts import PromptBuilder, PromptTemplate
from pipeline.teacher import forward_inputs, model_inputs

TEMPLATE = PromptTemplate()
ANSWERS = ("red", "yes", "2", "blue", "no", "green")
# image keys a family's processor returns beside input_ids / attention_mask, compared with one processor call
IMAGE_KEYS = ("pixel_values", "pixel_attention_mask", "image_sizes", "image_grid_thw", "image_attention_mask")


@functools.cache
def setup(name: str):
    """Processor, model (SDPA, frozen), family and a builder for family `name`; items whose images differ in
    size and aspect ratio and whose questions differ in length."""
    processor = processor_for(name)
    model = build_model(name, processor)
    model.set_attn_implementation("sdpa")
    model.requires_grad_(False)
    view = ModelView(model)
    builder = PromptBuilder(processor, view.family, TEMPLATE, max_length=4096)
    items = [
        Item(
            f"q{n}",
            (fixture_image(("red", "blue", "green")[n % 3], 1 + n % 3, IMAGE_SIZES[n % 4], seed=n),),
            QUESTIONS[n % len(QUESTIONS)][0].format(c="red"),
            (ANSWERS[n],),
        )
        for n in range(6)
    ]
    return processor, model, view, builder, items


def one_call(
    name: str, prompts: list[tuple[list[Item], Item, bool]], template=TEMPLATE
) -> dict[str, torch.Tensor]:
    """The processor's own encoding of whole prompts (demonstrations, query, with its answer or not), left
    padded: the independent reference for segment assembly."""
    processor, _, view, _, _ = setup(name)
    family = view.family

    def rounds(demos, query, answered) -> list[tuple[str, Item]]:
        texts = [(template.text(family, d.question, d.answers[0]), d) for d in demos]
        last = template.text(family, query.question, query.answers[0]) if answered else None
        return texts + [(last or template.prefix(family, query.question), query)]

    processor.tokenizer.padding_side = "left"
    if name == "idefics":  # the prompt-list form: each image becomes <fake><image><fake> in place, BOS added
        lists = []
        for prompt in prompts:
            pieces = []
            for text, item in rounds(*prompt):
                before, after = text.split(family.image_placeholder)
                pieces += [p for p in (before, item.images[0], after) if not isinstance(p, str) or p]
            lists.append(pieces)
        return dict(
            processor(text=lists, add_end_of_utterance_token=False, padding=True, return_tensors="pt")
        )
    texts = [(processor.tokenizer.bos_token or "") + "".join(t for t, _ in rounds(*p)) for p in prompts]
    images = [[item.images[0] for _, item in rounds(*p)] for p in prompts]
    # Idefics2 takes images nested per prompt; the others one flat list (LLaVA-OneVision: each image with its
    # own anyres patches, as each round is encoded)
    flat = images if family.image_axis == 1 else [image for row in images for image in row]
    out = processor(text=texts, images=flat, add_special_tokens=False, padding=True, return_tensors="pt")
    return dict(out)


def assert_same_inputs(ours: dict, reference: dict, what: str = ""):
    assert set(ours) - {"answer_mask"} == set(reference) - {"answer_mask"}, what
    for key, value in reference.items():
        assert ours[key].shape == value.shape, (what, key)
        assert torch.equal(ours[key].to(value.dtype), value), (what, key)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_assembled_prompts_equal_one_processor_call(name):
    _, _, _, builder, items = setup(name)
    check_one_call(name, builder, items, TEMPLATE)
    # the answer tokens are what one-call tokenization gives the answer, and they come last
    student = builder.student(items[3])
    answer = builder.processor.tokenizer.decode(student.input_ids[student.answer_mask])
    assert answer.strip() == items[3].answers[0] and student.answer_mask[-1]


CHAT = PromptTemplate("User:{image}{question}<end_of_utterance>\nAssistant: {answer}<end_of_utterance>\n")
WITH_EOS = PromptTemplate("{image}Question: {question} Short answer: {answer}</s>\n")


@pytest.mark.parametrize(
    ("name", "template"),
    [("idefics2", CHAT), ("idefics", CHAT), ("idefics", WITH_EOS), ("llava", CHAT)],
    ids=["idefics2-chat", "idefics-chat", "idefics-eos", "llava-chat"],
)
def test_other_templates_equal_one_processor_call(name, template):
    """Text before the image (SentencePiece would prepend "▁" to a round tokenized alone) and, for Idefics, an
    EOS inside the prompt (tokens after it see no image until the next one)."""
    processor, _, view, _, items = setup(name)
    if "<end_of_utterance>" not in processor.tokenizer.get_vocab():
        processor.tokenizer.add_special_tokens({"additional_special_tokens": ["<end_of_utterance>"]})
    builder = PromptBuilder(processor, view.family, template, max_length=4096)
    check_one_call(name, builder, items, template)


def check_one_call(name, builder, items, template):
    demos, query = items[:3], items[3]
    cases = {
        "teacher": (builder.teacher(demos, query), (demos, query, True)),
        "student": (builder.student(query), ([], query, True)),
        "generation": (builder.generation(demos, query), (demos, query, False)),
        "zero-shot": (builder.generation([], items[4]), ([], items[4], False)),
    }
    for what, (segment, prompt) in cases.items():
        assert_same_inputs(builder.collate([segment]), one_call(name, [prompt], template), what)
    # a batch of prompts of different lengths and images of different sizes, padded as the processor pads it
    third = (builder.teacher(items[4:5], items[5]), (items[4:5], items[5], True))
    batch = [cases["teacher"], cases["zero-shot"], third]
    assert_same_inputs(
        builder.collate([s for s, _ in batch]), one_call(name, [p for _, p in batch], template)
    )


def unit_shift(view) -> MimicShift:
    """A shift with unit-scale w, so that log Z1 = w . q depends on q's rotary positions; v large enough to show."""
    shift = MimicShift(spec_for(view), torch.Generator().manual_seed(0))
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        shift.w.copy_(torch.randn(shift.w.shape, generator=g))
        shift.v.copy_(torch.randn(shift.v.shape, generator=g))
    return shift


def rows_alone_vs_batch(model, view, builder, segments, positions: bool = True) -> float:
    """Largest logit difference between a left-padded batch and each row run alone, at the real tokens."""

    def run(batch):
        inputs = forward_inputs(view, batch, "cpu") if positions else model_inputs(batch, "cpu")
        return model(**inputs, use_cache=False).logits

    with torch.no_grad():
        logits = run(builder.collate(segments))
        worst = 0.0
        for row, segment in enumerate(segments):
            alone = run(builder.collate([segment]))[0]
            worst = max(worst, (logits[row, -len(segment.input_ids) :] - alone).abs().max().item())
    return worst


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_left_padded_batch_equals_rows_alone_with_the_shift_on(name):
    _, model, view, builder, items = setup(name)
    teacher = [builder.teacher(items[:k], items[3 + k]) for k in (0, 1, 2)]
    student = [builder.student(items[n]) for n in (0, 1, 4)]
    with attach(model, unit_shift(view)):
        assert rows_alone_vs_batch(model, view, builder, teacher) <= 1e-5
        assert rows_alone_vs_batch(model, view, builder, student) <= 1e-5
        if view.family.position_ids:  # what the positions fix: without them the rows shift
            assert rows_alone_vs_batch(model, view, builder, teacher, positions=False) > 1e-3
        prompts = [builder.generation(items[:k], items[3 + k]) for k in (0, 1, 2)]
        batched = greedy_logits(model, builder, prompts)
        for row, prompt in enumerate(prompts):
            alone = greedy_logits(model, builder, [prompt])
            steps = min(len(alone), len(batched))
            assert steps >= 1
            for step in range(steps):
                assert (batched[step][row] - alone[step][0]).abs().max().item() <= 1e-5


def greedy_logits(model, builder, prompts, steps: int = 3) -> list[torch.Tensor]:
    """Per-step logits [B, vocab] of greedy decoding, with the KV cache, as generate_answers runs it."""
    tokenizer = builder.processor.tokenizer
    with torch.no_grad():
        out = model.generate(
            **model_inputs(builder.collate(prompts), "cpu"),
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return list(out.logits)


@pytest.mark.parametrize("name", ["llava", "idefics2"])  # byte-level BPE and Metaspace vocabularies
def test_generation_stops_at_the_newline(name):
    _, model, view, builder, items = setup(name)
    tokenizer = builder.processor.tokenizer
    newline = tokenizer.convert_tokens_to_ids(SPECS[name].newline)
    assert newline in newline_tokens(tokenizer) and "\n" not in tokenizer.get_vocab()
    prompts = [builder.generation(items[:1], items[2]), builder.generation([], items[3])]
    widths: list[int] = []
    original = model.generate

    def spy(**kwargs):
        out = original(**kwargs)
        widths.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    def favour_newline(_module, _args, logits):  # the newline becomes the best token at the second step
        if logits.shape[1] == 1 and getattr(favour_newline, "steps", 0) >= 1:
            logits[..., newline] += 1e4
        favour_newline.steps = getattr(favour_newline, "steps", 0) + 1
        return logits

    handle = model.lm_head.register_forward_hook(favour_newline)
    model.generate = spy
    try:
        for beams in (1, 3):
            favour_newline.steps = 0
            out = generate_answers(model, builder, prompts, 2, beams, max_new_tokens=8)
            assert out.answers == [out.answers[0].strip()] + [out.answers[1].strip()]
    finally:
        handle.remove()
        del model.generate
    assert widths == [2, 2]  # one token, then the newline: not max_new_tokens, with and without beams


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_saved_checkpoint_loads_with_a_processor_that_encodes_the_same(name, tmp_path):
    from real_checkpoints import save_tiny_checkpoint

    from pipeline.models import load_model

    save_tiny_checkpoint(name, tmp_path)
    loaded = load_model(str(tmp_path))  # without torchvision: Qwen2-VL / OneVision lose only their video part
    _, _, _, builder, items = setup(name)
    again = PromptBuilder.for_model(loaded, TEMPLATE.round)
    for mine, theirs in ((builder.teacher(items[:2], items[2]), again.teacher(items[:2], items[2])),):
        assert_same_inputs(again.collate([theirs]), builder.collate([mine]))
    assert type(loaded.processor).__name__ == type(builder.processor).__name__


def test_a_broken_processor_is_one_clear_error(tmp_path):
    from real_checkpoints import save_tiny_checkpoint

    from pipeline.errors import MimicError
    from pipeline.models import load_model

    save_tiny_checkpoint("qwen2_vl", tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(MimicError, match=f"no usable processor in {tmp_path}"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("name", ["idefics2", "qwen2_vl"])  # SentencePiece/Metaspace and byte-level BPE
def test_a_checkpoint_without_tokenizer_files_is_refused_before_its_weights_are_read(name, tmp_path):
    # transformers builds an empty tokenizer (every text encodes to no ids) when the files are missing
    from real_checkpoints import save_tiny_checkpoint

    from pipeline.errors import MimicError
    from pipeline.models import load_model

    save_tiny_checkpoint(name, tmp_path)
    for path in tmp_path.iterdir():
        if path.name.startswith("tokenizer"):
            path.unlink()
    (tmp_path / "model.safetensors").write_bytes(b"not read")  # the check comes first
    with pytest.raises(MimicError, match=f"the tokenizer in {tmp_path} is empty"):
        load_model(str(tmp_path))
