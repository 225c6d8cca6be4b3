"""The embedded default: committed weights load like a checkpoint and really learn in context."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from pipeline.embedded import (
    AMBIGUOUS_QUESTION,
    ATTRIBUTES,
    EMBEDDED_NAME,
    MODEL_DIR,
    TASKS,
    make_items,
    render,
)
from pipeline.embedded.accuracy import (
    QUERY_TEMPLATE,
    ROUND_TEMPLATE,
    answer_token_id,
    encode_few_shot,
    few_shot_accuracy,
    sample_demos,
)
from pipeline.embedded.model import IMAGE_TOKENS, build_model, build_processor
from pipeline.embedded.pretrain import PretrainConfig, pretrain
from pipeline.embedded.tasks import NOISE, sample_scene, split_rng

SHOTS = 4
N_QUERIES = 200  # per task; one query more or less right moves accuracy by 0.005
EVAL_SEED = 1  # the build script reports seed 0: this checks other queries than docs/embedded.md
MIN_GAIN = 0.40  # required k-shot minus zero-shot accuracy, for every attribute task
NOISY_QUERIES = 400  # the noisy task's ICL curve: one query moves accuracy by 0.0025


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on shared cores two threads oversubscribe and run up to 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def loaded() -> tuple[LlavaForConditionalGeneration, LlavaProcessor, float]:
    start = time.perf_counter()
    model = AutoModelForImageTextToText.from_pretrained(MODEL_DIR)
    processor = AutoProcessor.from_pretrained(MODEL_DIR)
    return model.eval(), processor, time.perf_counter() - start


def test_committed_assets_load_fast_through_auto_classes(loaded):
    model, processor, seconds = loaded
    assert EMBEDDED_NAME == "embedded"
    assert seconds < 2.0, f"loading {MODEL_DIR} took {seconds:.2f} s"
    assert isinstance(model, LlavaForConditionalGeneration)
    assert isinstance(processor, LlavaProcessor)
    assert model.config.text_config.model_type == "qwen2"
    built = build_model(0)
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in built.state_dict().items()
    }, "the committed weights do not match build_config(): rebuild with stages/build_embedded.py"
    for key in (
        "image_token_id",
        "image_seq_length",
        "vision_feature_layer",
        "vision_feature_select_strategy",
    ):
        assert getattr(model.config, key) == getattr(built.config, key), key
    assert sum(f.stat().st_size for f in MODEL_DIR.glob("*.safetensors")) <= 20e6


def test_saved_processor_tokenizes_like_the_one_built_in_code(loaded):
    _, processor, _ = loaded
    built = build_processor()
    item = make_items("color", "query", 1, seed=0)[0]
    text = ROUND_TEMPLATE.format(question=item.question, answer="red")
    saved_out = processor(text=text, images=item.image, return_tensors="pt")
    built_out = built(text=text, images=item.image, return_tensors="pt")
    assert torch.equal(saved_out["input_ids"], built_out["input_ids"])
    assert torch.equal(saved_out["pixel_values"], built_out["pixel_values"])


def test_round_ends_in_eos_and_image_expands_to_the_model_feature_count(loaded):
    model, processor, _ = loaded
    tokenizer = processor.tokenizer
    item = make_items("shape", "support", 1, seed=0)[0]
    ids = processor(text=ROUND_TEMPLATE.format(question=item.question, answer="circle"), images=item.image)[
        "input_ids"
    ][0]
    assert ids.count(model.config.image_token_id) == IMAGE_TOKENS == model.config.image_seq_length
    assert ids[-1] == tokenizer.eos_token_id == model.generation_config.eos_token_id
    assert tokenizer.convert_ids_to_tokens(ids[-1]) == "\n"
    assert ids[-2] == answer_token_id(processor, "circle")
    assert tokenizer.bos_token_id not in ids, "the processor must not add BOS: the prompt builder does"
    for values in ATTRIBUTES.values():
        for answer in values:
            assert tokenizer.unk_token_id != answer_token_id(processor, answer)


def test_per_round_tokenization_equals_whole_sequence_tokenization(loaded):
    _, processor, _ = loaded
    demos = make_items("size", "support", 3, seed=0)
    query = make_items("size", "query", 1, seed=0)[0]
    ids, pixels = encode_few_shot(processor, demos, query)
    text = "".join(ROUND_TEMPLATE.format(question=d.question, answer=d.answers[0]) for d in demos)
    text += QUERY_TEMPLATE.format(question=query.question)
    whole = processor(text=text, images=[d.image for d in demos] + [query.image], return_tensors="pt")
    assert ids[0] == processor.tokenizer.bos_token_id
    assert torch.equal(ids[1:], whole["input_ids"][0])
    assert torch.equal(pixels, whole["pixel_values"])


def test_generate_answers_in_one_word_and_stops_at_newline(loaded):
    model, processor, _ = loaded
    support = make_items("color", "support", 8, seed=0)
    query = make_items("color", "query", 1, seed=0)[0]
    ids, pixels = encode_few_shot(processor, support[:SHOTS], query)
    out = model.generate(input_ids=ids[None], pixel_values=pixels, max_new_tokens=5, do_sample=False)
    new = out[0, len(ids) :].tolist()
    assert len(new) == 2 and new[-1] == processor.tokenizer.eos_token_id
    assert processor.tokenizer.convert_ids_to_tokens(new[0]) in ATTRIBUTES["color"]


def test_demonstrations_lift_accuracy_by_forty_points_on_every_attribute_task(loaded):
    model, processor, _ = loaded
    gains = {}
    for task in ATTRIBUTES:
        zero = few_shot_accuracy(model, processor, task, 0, N_QUERIES, EVAL_SEED)
        few = few_shot_accuracy(model, processor, task, SHOTS, N_QUERIES, EVAL_SEED)
        gains[task] = (zero, few)
    failing = {t: z_f for t, z_f in gains.items() if z_f[1] - z_f[0] < MIN_GAIN}
    assert not failing, f"(0-shot, {SHOTS}-shot) accuracy below a {MIN_GAIN} gain: {failing}"


def test_items_are_deterministic_and_ids_stable():
    first = make_items("position", "support", 20, seed=3)
    again = make_items("position", "support", 20, seed=3)
    other = make_items("position", "support", 20, seed=4)
    assert [i.id for i in first] == [f"position-support-{n}" for n in range(20)]
    assert [(i.image.tobytes(), i.answers) for i in first] == [(i.image.tobytes(), i.answers) for i in again]
    assert [i.image.tobytes() for i in first] != [i.image.tobytes() for i in other]
    assert make_items("position", "support", 5, seed=3) == first[:5]


def test_support_and_query_images_are_disjoint():
    for task in TASKS:
        support = {i.image.tobytes() for i in make_items(task, "support", 300, seed=0)}
        query = {i.image.tobytes() for i in make_items(task, "query", 300, seed=0)}
        assert len(support) == len(query) == 300
        assert not support & query


def test_noisy_task_icl_is_real_but_incomplete(loaded):
    """The benchmark's task (params.yaml): better with every doubling of shots up to 8, still at most 90% at 8 shots, and
    no better than a guess of the attribute without demonstrations (docs/embedded.md records eval seed 0;
    these are other queries)."""
    model, processor, _ = loaded
    accuracy = {
        k: few_shot_accuracy(model, processor, "color_noisy", k, NOISY_QUERIES, EVAL_SEED)
        for k in (0, 1, 4, 8)
    }
    assert accuracy[0] <= 0.40, accuracy  # a guess of the attribute: 1 in 4 (measured 0.22-0.36)
    assert accuracy[1] + 0.05 < accuracy[4] and accuracy[4] + 0.05 < accuracy[8] <= 0.90, accuracy


def test_noisy_support_items_answer_another_attribute_of_their_own_image_half_the_time():
    n = 2000
    items = make_items("color_noisy", "support", n, seed=3)
    rng = split_rng("color_noisy", "support", 3)
    scenes = [sample_scene(rng)[0] for _ in range(n)]  # the same stream: each item's attributes
    assert all(item.answers[0] in scene.values() for item, scene in zip(items, scenes))
    clean = sum(item.answers[0] == scene["color"] for item, scene in zip(items, scenes)) / n
    assert abs(clean - (1 - NOISE)) < 0.035, clean  # 3 binomial standard errors
    answered = {
        next(t for t, v in scene.items() if v == item.answers[0]) for item, scene in zip(items, scenes)
    }
    assert answered == set(ATTRIBUTES)
    queries = make_items("color_noisy", "query", 300, seed=3)  # the evaluation's queries are clean
    assert {q.answers[0] for q in queries} == set(ATTRIBUTES["color"])


def test_ambiguous_question_is_shared_and_answers_cover_each_attribute():
    for task in ATTRIBUTES:
        items = make_items(task, "query", 200, seed=0)
        assert {i.question for i in items} == {AMBIGUOUS_QUESTION}
        assert {i.answers[0] for i in items} == set(ATTRIBUTES[task])
        assert {i.task for i in items} == {task}


def test_render_draws_the_attributes_it_is_given():
    rng = np.random.default_rng(0)
    image = np.asarray(render("red", "square", "big", "left", rng), dtype=float)  # (H, W, 3)
    width = image.shape[1]
    left, right = image[:, : width // 2], image[:, width // 2 :]
    assert left[..., 0].mean() > right[..., 0].mean() + 40  # a big red object on the left half
    assert left[..., 0].max() > 150 and left[..., 2].max() < 120


def test_sample_demos_draws_distinct_support_items():
    support = make_items("shape", "support", 10, seed=0)
    demos = sample_demos(support, 4, 50, seed=0)
    assert all(len({d.id for d in row}) == 4 for row in demos)
    assert demos == sample_demos(support, 4, 50, seed=0)


def test_build_model_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = build_model(0), build_model(0), build_model(1)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def _pretrain_briefly(seed: int) -> LlavaForConditionalGeneration:
    config = dataclasses.replace(
        PretrainConfig(),
        explicit_steps=6,
        icl_steps=2,
        noisy_steps=2,
        noisy_rounds=3,
        batch_size=4,
        pool_size=64,
        warmup_steps=1,
    )
    return pretrain(build_model(0), build_processor(), config, seed=seed)


def test_a_few_pretraining_steps_train_the_vision_path_too():
    before = dict(build_model(0).named_parameters())
    model = _pretrain_briefly(seed=0)
    assert not model.training
    # The vision feature is the last encoder layer's output, before post_layernorm (unused, as in LLaVA).
    frozen = {name for name, p in model.named_parameters() if torch.equal(p, before[name])}
    assert frozen == {n for n in before if "post_layernorm" in n}


def test_pretraining_is_seeded():
    a, b, c = _pretrain_briefly(seed=0), _pretrain_briefly(seed=0), _pretrain_briefly(seed=1)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
