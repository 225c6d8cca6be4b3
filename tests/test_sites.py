"""Recorded sites equal the tensors a hand-written forward computes at the same places."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny, left_padded_batch

from pipeline.errors import MimicError
from pipeline.families import ModelView
from pipeline.methods.mimic import MimicShift, attach, spec_for
from pipeline.sites import record_sites


def test_layer_site_equals_hidden_states_and_mlp_site_is_the_residual_increment():
    model = build_tiny("llava")
    view = ModelView(model)
    ids, mask = left_padded_batch()
    with (
        torch.no_grad(),
        record_sites(view, "layer") as layer_out,
        record_sites(view, "mlp") as mlp_out,
        record_sites(view, "attn") as attn_out,
    ):
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    hidden = out.hidden_states
    for i in range(2):  # the last entry of hidden_states is after the final norm
        assert torch.allclose(layer_out[i], hidden[i + 1], atol=1e-6)
        # a pre-norm block: h_{i+1} = h_i + attn_i + mlp_i
        assert torch.allclose(hidden[i] + attn_out[i] + mlp_out[i], hidden[i + 1], atol=1e-5)
    assert not view.site_module(0, "mlp")._forward_hooks  # hooks removed


def test_recorded_sites_carry_gradient_to_shifts():
    model = build_tiny("idefics2")
    view = ModelView(model)
    shift = MimicShift(spec_for(view))
    ids, mask = left_padded_batch()
    with attach(model, shift), record_sites(view, "mlp", layers=[2]) as rec:
        model(input_ids=ids, attention_mask=mask)
    assert list(rec) == [2]
    rec[2].square().mean().backward()
    assert shift.v.grad[0].abs().sum() > 0


def test_unknown_site_is_refused():
    with pytest.raises(MimicError, match="unknown site"), record_sites(ModelView(build_tiny("llava")), "ffn"):
        pass
