"""Golden tests of the baselines and ablations against hand-written computations: the mu ablations and HiFICL
against attention written out over an explicit score matrix, LIVE's hook against its formula, the top-k KL
against the full-vocabulary KL, LoRA and MimIC + LoRA against peft's own loader."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny, extra_inputs, left_padded_batch
from peft import PeftModel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from pipeline.families import ModelView
from pipeline.methods import TRAINED, build_method
from pipeline.methods.io import load_method, save_method
from pipeline.training import topk_kl

REF = {"method": None, "layers": {}}
FAMILIES = ["idefics2", "llava", "qwen2_vl"]


def _scores(module, query, key, value, attention_mask, scaling):
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    t, s = query.shape[2], key.shape[2]
    scores = query @ key.transpose(-1, -2) * scaling  # (B, H, T, S)
    if attention_mask is None:
        keep = torch.ones(t, s, dtype=torch.bool).tril(diagonal=s - t)
    else:
        keep = attention_mask.bool() if attention_mask.dtype == torch.bool else attention_mask == 0
    keep = keep.expand(scores.shape)
    return scores.masked_fill(~keep, float("-inf")), value, keep


def _reference(module, query, key, value, attention_mask, scaling=None, **_):
    """The methods written out over an explicit score matrix, from their definitions."""
    scores, value, keep = _scores(module, query, key, value, attention_mask, scaling)
    empty = ~keep.any(-1, keepdim=True)  # left-padding rows
    layer, method = REF["layers"].get(module), REF["method"]
    if layer is None or getattr(module, "is_cross_attention", False):
        out = torch.softmax(scores.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0) @ value
        return out.transpose(1, 2).contiguous(), None
    if (
        method.name == "hificl"
    ):  # attention over [real keys; learned keys], the learned ones seen by every query
        keys = method.key_a[layer] @ method.key_b[layer]  # (H, P, D)
        values = method.value_a[layer] @ method.value_b[layer]
        b = query.shape[0]
        learned = query @ keys.transpose(-1, -2) * scaling  # (B, H, T, P)
        probs = torch.softmax(torch.cat([scores, learned], -1), -1)
        out = probs @ torch.cat([value, values[None].expand(b, -1, -1, -1)], 2)
        return out.transpose(1, 2).contiguous(), None
    out = torch.softmax(scores.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0) @ value
    z2 = torch.exp(torch.logsumexp(scores.masked_fill(empty, 0.0), -1))  # (B, H, T)
    v = method.v[layer]
    if method.name == "query_sharing_mu":
        mu = torch.sigmoid(method.m[layer])[None, :, None].expand_as(z2)
    else:  # head_sharing_mu: Z1 = exp(sum_h w_h . q_h + b), Z2 = the geometric mean of the heads' Z2
        z1 = torch.exp(torch.einsum("bhtd,hd->bt", query, method.w[layer]) + method.b[layer])  # (B, T)
        mean_z2 = z2.prod(1) ** (1 / z2.shape[1])
        mu = (z1 / (z1 + mean_z2))[:, None, :].expand_as(z2)
    out = out + mu[..., None] * v[None, :, None, :]
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("test_baselines", _reference)
ALL_MASK_ATTENTION_FUNCTIONS.register("test_baselines", sdpa_mask)


def reference_logits(model, method, **inputs):
    view = ModelView(model)
    key = view.family.text_config
    REF.update(method=method, layers={a: i for i, a in enumerate(view.attention_modules())})
    model.set_attn_implementation({key: "test_baselines"} if key else "test_baselines")
    try:
        with torch.no_grad():
            return model(**inputs).logits
    finally:
        model.set_attn_implementation({key: "sdpa"} if key else "sdpa")


def randomised(name: str, model, seed: int = 0, scale: float = 0.5):
    """`name` for this model with every tensor drawn at `scale` (zero-initialised factors included)."""
    g = torch.Generator().manual_seed(seed)
    method = build_method(name, TRAINED[name][1], ModelView(model), g)
    with torch.no_grad():
        for p in method.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))
    return method


def batch(name: str, seed: int = 0):
    ids, mask = left_padded_batch(seed=seed)
    return dict(input_ids=ids, attention_mask=mask, **extra_inputs(name, ids)), mask.bool()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["head_sharing_mu", "query_sharing_mu", "hificl"])
def test_attention_methods_equal_their_written_out_definition(family, name):
    model = build_tiny(family)
    inputs, valid = batch(family, seed=2)
    method = randomised(name, model, scale=0.3)
    with torch.no_grad():
        base = model(**inputs).logits
        with method.attach(model):
            ours = model(**inputs).logits
        after = model(**inputs).logits
    want = reference_logits(model, method, **inputs)
    assert (ours - want)[valid].abs().max() <= 1e-4
    assert (ours - base)[valid].abs().max() > 1e-3  # it acts
    assert torch.equal(after, base)  # removed without a trace


def test_hificl_with_zero_values_only_dilutes_attention():
    """With the value factor at its initial zero the learned keys still take a share of the attention, so
    the logits move (HiFICL's formula, as its code computes it); they equal SA scaled by Z / (Z + Z')."""
    model = build_tiny("llava")
    inputs, valid = batch("llava", seed=3)
    method = build_method("hificl", TRAINED["hificl"][1], ModelView(model), torch.Generator().manual_seed(0))
    assert torch.count_nonzero(method.value_b) == 0
    with torch.no_grad():
        base = model(**inputs).logits
        with method.attach(model):
            ours = model(**inputs).logits
    want = reference_logits(model, method, **inputs)
    assert (ours - want)[valid].abs().max() <= 1e-4
    assert (ours - base)[valid].abs().max() > 1e-4


def test_live_adds_a_scaled_vector_and_keeps_each_token_norm():
    model = build_tiny("idefics2")
    inputs, valid = batch("idefics2", seed=4)
    view = ModelView(model)
    method = randomised("live", model, scale=1.0)
    seen = {}

    def written(layer):
        def hook(_m, _a, h):
            shifted = h + method.scale[layer] * method.v[layer]
            seen[layer] = h.norm(dim=-1)
            return shifted / shifted.norm(dim=-1, keepdim=True) * h.norm(dim=-1, keepdim=True)

        return hook

    with torch.no_grad():
        handles = [
            view.site_module(i, "mlp").register_forward_hook(written(i)) for i in range(len(view.layers))
        ]
        want = model(**inputs).logits
        for h in handles:
            h.remove()
        with method.attach(model):
            ours = model(**inputs).logits
            out = {}
            probe = view.site_module(0, "mlp").register_forward_hook(lambda m, a, h: out.setdefault(0, h))
            model(**inputs)
            probe.remove()
    assert (ours - want)[valid].abs().max() <= 1e-5
    assert torch.allclose(out[0].norm(dim=-1), seen[0], atol=1e-4)


def test_topk_kl_is_the_full_kl_when_k_is_the_vocabulary_and_the_coarsened_kl_below():
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(6, 50, generator=g) * 3, torch.randn(6, 50, generator=g) * 3
    logp = torch.log_softmax(teacher, -1)
    full = F.kl_div(torch.log_softmax(student, -1), logp, log_target=True, reduction="sum")
    top = logp.topk(50, -1)
    assert torch.allclose(topk_kl(student, top.values, top.indices), full, rtol=1e-5)
    top = logp.topk(5, -1)
    p, q = logp.exp(), torch.softmax(student, -1)
    kept = torch.zeros_like(p, dtype=torch.bool).scatter(-1, top.indices, True)
    p_tail, q_tail = (p * ~kept).sum(-1), (q * ~kept).sum(-1)
    by_hand = (p * (p.log() - q.log()) * kept).sum() + (p_tail * (p_tail.log() - q_tail.log())).sum()
    assert torch.allclose(topk_kl(student, top.values, top.indices), by_hand, rtol=1e-5)
    assert topk_kl(teacher, top.values, top.indices).abs() < 1e-5  # student = teacher


@pytest.mark.parametrize("name", ["lora", "mimic_lora"])
def test_lora_methods_reload_and_peft_loads_the_lora_part(tmp_path, name):
    model = build_tiny("idefics2")
    inputs, valid = batch("idefics2", seed=5)
    view = ModelView(model)
    with torch.no_grad():
        base = model(**inputs).logits
    method = build_method(name, TRAINED[name][1], view, torch.Generator().manual_seed(0))
    with method.attach(model), torch.no_grad():
        for p in method.trainable():  # lora_B starts at zero: give every factor a value
            p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        trained = model(**inputs).logits
        save_method(method, tmp_path, view)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, base)  # removed: the original Linear modules are back
        assert (trained - base)[valid].abs().max() > 1e-3
        reloaded = load_method(tmp_path, view)
        with reloaded.attach(model):
            again = model(**inputs).logits
        assert reloaded.num_parameters() == method.num_parameters() > 0
        assert (again - trained)[valid].abs().max() <= 1e-5
        lora_dir = tmp_path if name == "lora" else tmp_path / "lora"
        fresh = build_tiny("idefics2")
        peft_model = PeftModel.from_pretrained(fresh, str(lora_dir))
        by_peft = peft_model(**inputs).logits
    if name == "lora":
        assert (by_peft - trained)[valid].abs().max() <= 1e-5
    else:  # peft holds the LoRA part only: MimIC's heads on top of it give the trained logits
        with reloaded.shift.attach(fresh), torch.no_grad():
            both = peft_model(**inputs).logits
        assert (by_peft - base)[valid].abs().max() > 1e-4
        assert (both - trained)[valid].abs().max() <= 1e-5


def test_methods_on_two_models_in_one_process_do_not_touch_each_other():
    a, b = build_tiny("llava", seed=0), build_tiny("llava", seed=1)
    inputs, valid = batch("llava", seed=6)
    shift, pairs = randomised("mimic", a, seed=1), randomised("hificl", b, seed=2)
    with torch.no_grad():
        with shift.attach(a):
            alone_a = a(**inputs).logits
        with pairs.attach(b):
            alone_b = b(**inputs).logits
        plain_b = b(**inputs).logits
        with shift.attach(a):
            beside = b(**inputs).logits  # a's method must not reach b
            with pairs.attach(b):
                both_a, both_b = a(**inputs).logits, b(**inputs).logits
    assert torch.equal(beside, plain_b)
    assert (both_a - alone_a)[valid].abs().max() <= 1e-6 and (both_b - alone_b)[valid].abs().max() <= 1e-6


@pytest.mark.parametrize("name", ["live", "hificl", "lora", "mimic_lora"])
def test_every_method_attaches_to_every_family_and_leaves_no_trace(family_name, name):
    """LoRA's targets are the text decoder's self-attention projections of each family (not the vision tower's,
    not Idefics' cross-attention); every method changes the logits while attached and nothing after."""
    model = build_tiny(family_name)
    inputs, valid = batch(family_name, seed=7)
    view = ModelView(model)
    method = (
        randomised(name, model)
        if name in ("live", "hificl")
        else build_method(name, TRAINED[name][1], view, torch.Generator().manual_seed(0))
    )
    geo = view.geometry
    with torch.no_grad():
        base = model(**inputs).logits
        with method.attach(model):
            if name in ("lora", "mimic_lora"):
                adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
                per_layer = len(TRAINED[name][1].targets)
                assert len(adapted) == geo.num_layers * per_layer, sorted(adapted)
                assert all(f".{view.family.attention}." in n and "vision" not in n for n in adapted)
                for p in method.trainable():
                    p.normal_(0, 0.3)
            on = model(**inputs).logits
        off = model(**inputs).logits
    assert (on - base)[valid].abs().max() > 1e-4
    assert torch.equal(off, base)


def test_a_lora_target_typo_is_one_line_before_any_model():
    from pipeline.errors import MimicError
    from pipeline.methods import method_configs

    section = {**TRAINED["lora"][1].to_dict(), "targets": ["qproj"]}
    with pytest.raises(
        MimicError, match=r"targets \['qproj'\]: LoRA adapts the self-attention projections q_proj"
    ):
        method_configs({"lora": section})


@pytest.mark.parametrize("name", ["lora", "mimic_lora"])
def test_a_lora_reattached_to_its_model_puts_its_layers_back_without_peft(monkeypatch, name):
    # evaluate attaches once per chunk: the second attach must equal the first, without injecting again, and
    # new weights (a checkpoint loaded while detached) or another model must inject afresh
    import pipeline.methods.lora as lora_module

    model, other = build_tiny("qwen2_vl"), build_tiny("qwen2_vl")  # equal weights, two models
    inputs, valid = batch("qwen2_vl", seed=8)
    view = ModelView(model)
    method = build_method(name, TRAINED[name][1], view, torch.Generator().manual_seed(0))
    injected = []
    real = lora_module.get_peft_model
    monkeypatch.setattr(lora_module, "get_peft_model", lambda *a, **k: injected.append(1) or real(*a, **k))
    with torch.no_grad():
        base = model(**inputs).logits
        with method.attach(model):
            for p in method.trainable():
                p.normal_(0, 0.3)
            first = model(**inputs).logits
        assert torch.equal(model(**inputs).logits, base) and not hasattr(model, "peft_config")
        state = method.checkpoint_state()
        with method.attach(model):
            again = model(**inputs).logits
        with method.attach(other):  # another model: injected there, with the same weights
            on_other = other(**inputs).logits
        assert len(injected) == 2 and torch.equal(again, first)
        assert (first - base)[valid].abs().max() > 1e-4 and torch.equal(model(**inputs).logits, base)
        lora_state = {k: v for k, v in state.items() if "lora_" in k}
        method.load_checkpoint_state({**state, **{k: torch.zeros_like(v) for k, v in lora_state.items()}})
        with method.attach(model):  # new weights: injected afresh with them
            zeroed = model(**inputs).logits
    assert len(injected) == 3 and (on_other - first)[valid].abs().max() <= 1e-6
    if name == "lora":
        assert torch.equal(zeroed, base)  # a zero LoRA is the base model
    else:
        with method.shift.attach(model), torch.no_grad():
            assert torch.equal(zeroed, model(**inputs).logits)  # MimIC's heads alone


def test_a_lora_parked_then_its_model_moved_injects_afresh(monkeypatch):
    # the parked LoRA weights are not in the model's tree: a move of the model leaves them behind
    import pipeline.methods.lora as lora_module

    model = build_tiny("llava")
    view = ModelView(model)
    method = build_method("lora", TRAINED["lora"][1], view, torch.Generator().manual_seed(0))
    injected = []
    real = lora_module.get_peft_model
    monkeypatch.setattr(lora_module, "get_peft_model", lambda *a, **k: injected.append(1) or real(*a, **k))
    with method.attach(model):
        pass
    model.to("meta")  # another device (no GPU here): the base layers move, the parked LoRA weights do not
    with method.attach(model):
        assert {p.device.type for n, p in model.named_parameters() if "lora_" in n} == {"meta"}
    assert len(injected) == 2
