"""Task and function vectors: the cached last-token signals against the model's own hidden states, the
replacement (tv) and addition (fv) against the hidden states they should produce, and fitting from the cache."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT, SMALL, build_tiny, left_padded_batch

from pipeline.cache.store import CacheReader
from pipeline.config import load_params
from pipeline.families import ModelView
from pipeline.methods import TRAINED, build_method
from pipeline.methods.vectors import causal_mediation, mean_last_token
from pipeline.models import load_model
from pipeline.prompts import PromptBuilder
from pipeline.samples import teacher_batch, training_samples
from pipeline.splits import make_splits
from pipeline.teacher import forward_inputs, last_prompt_positions
from stages.extract import extract
from stages.train import train

PARAMS = ROOT / "params.yaml"
SETTINGS = [
    *SMALL,
    "data.n_val=8",
    "data.train={kind: embedded, task: color, split: support, n: 72, seed: 0}",
]


def layer_inputs(model, view, **inputs):
    """Each decoder layer's input hidden states ([B, T, hidden]; layer l + 1's input is layer l's output, after
    every hook on layer l), and the logits. transformers' output_hidden_states records a layer's output before
    later hooks change it, so it cannot serve here."""
    seen = {}
    hooks = [
        block.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: seen.__setitem__(i, args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True,
        )
        for i, block in enumerate(view.layers)
    ]
    try:
        with torch.no_grad():
            out = model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen, out


@pytest.mark.parametrize("name", ["tv", "fv"])
def test_the_vector_is_written_at_the_last_prompt_token_only(name):
    model = build_tiny("idefics2")
    view = ModelView(model)
    ids, mask = left_padded_batch(seed=3)
    method = build_method(name, TRAINED[name][1], view, torch.Generator())
    method.layer = 1
    with torch.no_grad():
        method.vector.normal_(0, 1, generator=torch.Generator().manual_seed(0))
    base, base_out = layer_inputs(model, view, input_ids=ids, attention_mask=mask)
    positions = torch.tensor([5, 7, 9])
    with method.attach(model):
        method.positions = positions
        got, out = layer_inputs(model, view, input_ids=ids, attention_mask=mask)
    rows = torch.arange(3)
    written = got[2][rows, positions]  # layer 2's input: layer 1's output
    want = method.vector.expand(3, -1) if name == "tv" else base[2][rows, positions] + method.vector
    assert torch.allclose(written, want, atol=1e-6)
    for row, p in enumerate(positions.tolist()):  # earlier positions and earlier layers see nothing
        assert torch.equal(got[2][row, :p], base[2][row, :p]) and torch.equal(
            got[2][row, p + 1 :], base[2][row, p + 1 :]
        )
        assert torch.allclose(out.logits[row, :p], base_out.logits[row, :p], atol=1e-6)
        assert not torch.allclose(out.logits[row, p:], base_out.logits[row, p:])
    assert torch.equal(got[1], base[1])


def test_generation_writes_the_prefill_last_position_and_leaves_decoding_steps():
    model = build_tiny("llava")
    view = ModelView(model)
    ids, mask = left_padded_batch(seed=4)
    method = build_method("tv", TRAINED["tv"][1], view, torch.Generator())
    method.layer = 0
    with torch.no_grad():
        method.vector.normal_(0, 1, generator=torch.Generator().manual_seed(1))
    base, _ = layer_inputs(model, view, input_ids=ids, attention_mask=mask)
    with method.attach(model):
        prefill, out = layer_inputs(model, view, input_ids=ids, attention_mask=mask, use_cache=True)
        step, _ = layer_inputs(
            model, view, input_ids=ids[:, -1:], attention_mask=torch.cat([mask, mask[:, -1:]], 1),
            past_key_values=out.past_key_values,
        )  # fmt: skip
    assert torch.allclose(prefill[1][:, -1], method.vector.expand(3, -1))
    assert torch.equal(prefill[1][:, :-1], base[1][:, :-1])
    assert not torch.allclose(step[1][:, -1], method.vector.expand(3, -1))  # a decoding step is left alone


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vectors")
    extract(PARAMS, tmp / "teacher.zarr", SETTINGS)
    return tmp


def test_cached_last_token_signals_are_the_models_own_states(fitted):
    params = load_params(PARAMS, SETTINGS)
    loaded = load_model("embedded")
    view = loaded.view
    splits = make_splits(params.data)
    ex = params.extract
    samples = training_samples(splits.train, splits.support, ex.k, ex.m, ex.seed)
    builder = PromptBuilder.for_model(loaded, params.prompt)
    reader = CacheReader.open(fitted / "teacher.zarr")
    indices = [0, 5, 11]
    batch, lengths = teacher_batch(builder, samples, indices)
    positions = last_prompt_positions(batch["answer_mask"], lengths)
    attn = {}
    hooks = [
        view.attention_modules()[layer].register_forward_hook(
            lambda m, a, out, layer=layer: attn.__setitem__(layer, out[0])
        )
        for layer in range(len(view.layers))
    ]
    with torch.no_grad():
        out = loaded.model(**forward_inputs(view, batch, "cpu"), output_hidden_states=True)
    for h in hooks:
        h.remove()
    hidden, heads = reader.read_last(0, len(reader))
    rows = torch.arange(len(indices))
    inputs, _ = layer_inputs(loaded.model, view, **forward_inputs(view, batch, "cpu"))
    last = len(view.layers) - 1
    norm = view.model.get_submodule(view.family.decoder_layers.rsplit(".", 1)[0]).norm
    for layer in range(len(view.layers)):
        if layer < last:  # layer l's output is layer l + 1's input
            assert torch.allclose(hidden[indices, layer], inputs[layer + 1][rows, positions], atol=1e-5)
        else:  # the last layer's output, through the final norm, is the model's last hidden state
            assert torch.allclose(
                norm(hidden[indices, layer]), out.hidden_states[-1][rows, positions], atol=1e-5
            )
        # the heads' outputs, through o_proj, give the attention block's output there
        projected = view.output_projection(layer)(heads[indices, layer])
        assert torch.allclose(projected, attn[layer][rows, positions], atol=1e-5)
    for row, j in enumerate(indices):  # the last prompt token is the one before the query's answer
        query = samples.demos(j)[0]
        first_answer = int(builder.tokens(query).answer_mask.nonzero()[0])
        assert positions[row] == batch["input_ids"].shape[1] - lengths[row] + first_answer - 1
    mean_hidden, _ = mean_last_token(reader, chunk=7)
    assert torch.allclose(mean_hidden, hidden.mean(0), atol=1e-5)


@pytest.mark.parametrize("name", ["tv", "fv"])
def test_fit_from_the_cache_chooses_on_validation_queries(fitted, name):
    summary = train(PARAMS, fitted / "teacher.zarr", fitted / name, [*SETTINGS, f"train.method={name}"])
    num_layers = 4
    assert set(summary["validation_ce"]) == {str(i) for i in range(num_layers)}
    assert summary["layer"] == min(
        summary["validation_ce"], key=lambda k: summary["validation_ce"][k], default=0
    ) or (summary["validation_ce"][str(summary["layer"])] == min(summary["validation_ce"].values()))
    assert (fitted / name / "method" / "method.safetensors").is_file()
    again = train(PARAMS, fitted / "teacher.zarr", fitted / name, [*SETTINGS, f"train.method={name}"])
    assert again["validation_ce"] == summary["validation_ce"]  # a finished fit only rewrites its outputs
    changed = [*SETTINGS, f"train.method={name}", "data.n_val=5"]
    other = train(PARAMS, fitted / "teacher.zarr", fitted / name, changed, replace=True)
    assert (
        other["validation_ce"] != summary["validation_ce"]
    )  # other validation queries: fitted again, not reused
    if name == "fv":
        assert len(summary["heads"]) == 10 and summary["head_effects"] == sorted(
            summary["head_effects"], reverse=True
        )


def test_causal_mediation_equals_one_patched_forward(fitted):
    """One head's effect, computed by hand for the one shuffled prompt: patch that head alone."""
    from pipeline.methods.vectors import FitData, FunctionVectorConfig, shuffled_prompts

    params = load_params(PARAMS, SETTINGS)
    loaded = load_model("embedded")
    view = loaded.view
    splits = make_splits(params.data)
    builder = PromptBuilder.for_model(loaded, params.prompt)
    reader = CacheReader.open(fitted / "teacher.zarr")
    data = FitData(loaded.model, view, builder, reader, splits.support, splits.val, params.extract.k, 8)
    geo = view.geometry
    _, heads = mean_last_token(reader)
    mean_heads = heads.view(geo.num_layers, geo.num_heads, geo.head_dim)
    config = FunctionVectorConfig(layers=None, heads=3, mediation_prompts=1, seed=5)
    effect = causal_mediation(data, mean_heads, config)
    ((demos, query),) = shuffled_prompts(data, 1, 5)
    assert [d.answers for d in demos] != [splits.support[0].answers] * len(demos)
    one = builder.collate([builder.generation(demos, query)])
    target = int(builder.tokens(query).input_ids[builder.tokens(query).answer_mask][0])
    layer, head, d = 2, 1, geo.head_dim

    def patch(_m, args):
        x = args[0].clone()
        x[0, -1, head * d : (head + 1) * d] = mean_heads[layer, head]
        return (x,)

    with torch.no_grad():
        base = torch.softmax(loaded.model(**forward_inputs(view, one, "cpu")).logits[0, -1], -1)[target]
        handle = view.output_projection(layer).register_forward_pre_hook(patch)
        patched = torch.softmax(loaded.model(**forward_inputs(view, one, "cpu")).logits[0, -1], -1)[target]
        handle.remove()
    assert effect[layer, head] == pytest.approx(float(patched - base), abs=1e-5)
