"""generate_answers end to end on a tiny Qwen2-VL: zero-shot, ICL and MimIC prompts from the PromptBuilder.

Qwen2-VL prompts carry mm_token_type_ids [B, T] next to input_ids, from which the model builds its 3D M-RoPE
positions at prefill and keeps per-row `rope_deltas` for the decoding steps. Batches are left-padded and of
different lengths, so every greedy decoding step's logits are checked against an independent reference: one
prompt at a time, unpadded, no KV cache, one forward over the prompt and the generated tokens.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import build_tiny
from test_prompts_qwen2vl import image, tiny_qwen2vl_processor

from pipeline.data import Item
from pipeline.evaluation import generate_answers
from pipeline.families import ModelView
from pipeline.methods.mimic import MimicShift, attach, spec_for
from pipeline.prompts import PromptBuilder, PromptTemplate, Segment, collate

NEW = 5  # max_new_tokens
# Images of different shapes (and questions of different lengths): prompts of different lengths, i.e. left padding.
SIZES = ((8, 16), (16, 16), (16, 8), (12, 12))
QA = [
    ("what is this ?", "red"),
    ("what is this ?", "blue"),
    ("is this red ?", "green"),
    ("what is this ?", "blue"),
    ("is this ?", "red"),
    ("blue ?", "green"),
]


@pytest.fixture(scope="module")
def model():
    return build_tiny("qwen2_vl")


@pytest.fixture(scope="module")
def builder(model) -> PromptBuilder:
    family = ModelView(model).family
    return PromptBuilder(tiny_qwen2vl_processor(), family, PromptTemplate(), max_length=256)


@pytest.fixture(scope="module")
def items() -> list[Item]:
    return [Item(f"item-{n}", (image(n, *SIZES[n % len(SIZES)]),), q, (a,)) for n, (q, a) in enumerate(QA)]


def zero_shot(builder, items) -> list[Segment]:
    return [builder.generation([], q) for q in items[3:]]


def icl(builder, items) -> list[Segment]:
    """k=2: queries 3..5, each with its own pair of demonstrations out of items 0..2."""
    support, queries = items[:3], items[3:]
    demos = [support[:2], support[1:], [support[2], support[0]]]
    return [builder.generation(d, q) for d, q in zip(demos, queries)]


@contextlib.contextmanager
def recording(model):
    """Record what every model.generate call made: new tokens [n] and per-step logits [n, vocab] of each row.

    generate_answers returns text only; the spy also asks generate for its logits, which changes nothing it computes.
    """
    rows: list[list[int]] = []
    logits: list[torch.Tensor] = []
    widths: list[int] = []
    original = model.generate

    def spy(**kwargs):
        out = original(**kwargs, output_logits=True, return_dict_in_generate=True)
        new = out.sequences[:, kwargs["input_ids"].shape[1] :]
        widths.append(new.shape[1])
        rows.extend(new.tolist())
        if kwargs.get("num_beams", 1) == 1:
            logits.extend(torch.stack(out.logits, 1))  # (B, n, V)
        return out.sequences

    model.generate = spy
    try:
        yield rows, logits, widths
    finally:
        del model.generate  # back to the class's method


def generate(model, builder, prompts, batch_size=2, num_beams=1):
    with recording(model) as (rows, logits, widths):
        out = generate_answers(model, builder, prompts, batch_size, num_beams, NEW, desc="test")
    return out, rows, logits, widths


def stops(builder) -> set[int]:
    tokenizer = builder.processor.tokenizer
    return {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("\n")}


def until_stop(row: list[int], stop: set[int]) -> list[int]:
    """A generated row up to and including its first stop token (the rest is padding)."""
    for i, token in enumerate(row):
        if token in stop:
            return row[: i + 1]
    return row


def uncached_logits(model, builder, prompt: Segment, tokens: list[int]) -> torch.Tensor:
    """The logits [n, vocab] predicting each of `tokens` after one unpadded prompt: one full forward over prompt +
    tokens without a KV cache (generated tokens are text: token type 0)."""
    extra = torch.tensor(tokens, dtype=prompt.input_ids.dtype)
    types = {
        k: torch.cat([v, torch.zeros(len(tokens), dtype=v.dtype)]) for k, v in prompt.token_types.items()
    }
    whole = Segment(
        torch.cat([prompt.input_ids, extra]),
        torch.zeros(len(prompt.input_ids) + len(extra), dtype=torch.bool),
        prompt.images,
        types,
    )
    batch = collate([whole], builder.family, builder.processor.tokenizer.pad_token_id)
    del batch["answer_mask"]
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits[0]
    n = len(prompt.input_ids)
    return logits[n - 1 : n - 1 + len(tokens)]


def check_against_uncached(model, builder, prompts, rows, logits):
    """Each row's cached, left-padded decoding steps equal full forwards of its prompt alone, and are greedy."""
    stop = stops(builder)
    for prompt, row, got in zip(prompts, rows, logits):
        tokens = until_stop(row, stop)
        want = uncached_logits(model, builder, prompt, tokens)
        assert (got[: len(tokens)] - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))
        assert want.argmax(-1).tolist() == tokens


def check_bounds(builder, prompts, out, rows, widths, batch_size):
    assert len(out.answers) == len(rows) == len(prompts)
    assert out.prompt_tokens == [len(p.input_ids) for p in prompts]
    assert len(widths) == -(-len(prompts) // batch_size)
    assert all(1 <= w <= NEW for w in widths)
    for row in rows:
        assert 1 <= len(until_stop(row, stops(builder))) <= NEW
    assert all("\n" not in a for a in out.answers)


@pytest.mark.parametrize("kind", ["zero_shot", "icl"])
def test_greedy_generation_equals_uncached_single_prompt_decoding(model, builder, items, kind):
    prompts = (zero_shot if kind == "zero_shot" else icl)(builder, items)
    lengths = [len(p.input_ids) for p in prompts]
    assert len(set(lengths)) == len(lengths), "prompts of different lengths: batches are left-padded"
    if kind == "icl":  # two demonstrations, each with its image, before the query
        assert [len(p.images["image_grid_thw"]) for p in prompts] == [3, 3, 3]
        assert min(lengths) > max(len(p.input_ids) for p in zero_shot(builder, items))
    # batch_size 2 over 3 prompts: a padded batch of 2, then a batch of 1 with fresh rope_deltas
    out, rows, logits, widths = generate(model, builder, prompts, batch_size=2)
    check_bounds(builder, prompts, out, rows, widths, 2)
    check_against_uncached(model, builder, prompts, rows, logits)
    again, rows_again, _, _ = generate(model, builder, prompts, batch_size=3)
    assert rows_again == rows and again.answers == out.answers


@pytest.mark.parametrize("kind", ["zero_shot", "icl"])
def test_beam_search_runs_and_is_deterministic(model, builder, items, kind):
    prompts = (zero_shot if kind == "zero_shot" else icl)(builder, items)
    out, rows, _, widths = generate(model, builder, prompts, batch_size=2, num_beams=3)
    check_bounds(builder, prompts, out, rows, widths, 2)
    again, rows_again, _, _ = generate(model, builder, prompts, batch_size=2, num_beams=3)
    assert rows_again == rows and again.answers == out.answers


def test_mimic_generation_with_attached_shift(model, builder, items):
    prompts = zero_shot(builder, items)
    plain, plain_rows, plain_logits, _ = generate(model, builder, prompts)
    g = torch.Generator().manual_seed(0)
    shift = MimicShift(spec_for(ModelView(model)), g)
    with torch.no_grad():
        shift.v.copy_(5.0 * torch.randn(shift.v.shape, generator=g))  # large: must change what is generated
    with attach(model, shift):
        shift.enabled = False
        off, off_rows, off_logits, _ = generate(model, builder, prompts)
        shift.enabled = True
        on, on_rows, on_logits, widths = generate(model, builder, prompts)
        check_bounds(builder, prompts, on, on_rows, widths, 2)
        # the shift in cached decoding steps (one query token, KV heads read in place) against full forwards
        check_against_uncached(model, builder, prompts, on_rows, on_logits)
        again, again_rows, _, _ = generate(model, builder, prompts, batch_size=3)
        assert again_rows == on_rows and again.answers == on.answers
    assert off_rows == plain_rows and off.answers == plain.answers
    assert all(torch.equal(a, b) for a, b in zip(off_logits, plain_logits))
    assert on_rows != plain_rows, "a large shift must change the generated tokens of at least one prompt"
    after, after_rows, after_logits, _ = generate(model, builder, prompts)  # detached: the model is as before
    assert after_rows == plain_rows and all(torch.equal(a, b) for a, b in zip(after_logits, plain_logits))
