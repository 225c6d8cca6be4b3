"""Saving and loading shift weights, and loading models from local directories."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny, left_padded_batch

from pipeline.errors import MimicError
from pipeline.families import ModelView, family_for
from pipeline.methods import TRAINED, build_method
from pipeline.methods.io import CONFIG, WEIGHTS, load_method, save_method
from pipeline.methods.mimic import MimicShift, attach, spec_for
from pipeline.models import config_fingerprint, load_model


@pytest.mark.parametrize("name", ["mimic", "head_sharing_mu", "query_sharing_mu", "live", "hificl"])
def test_saved_method_reloads_to_the_same_outputs(tmp_path, name):
    model = build_tiny("llava")
    view = ModelView(model)
    g = torch.Generator().manual_seed(1)
    if name == "mimic":
        shift = MimicShift(spec_for(view, layers=(0, 2)), g)
    else:
        shift = build_method(name, TRAINED[name][1], view, g)
    with torch.no_grad():
        for p in shift.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    save_method(shift, tmp_path, view, provenance={"run": "test"})
    config = json.loads((tmp_path / CONFIG).read_text())
    assert (
        config["family"] == "llava" and config["method"] == name and config["provenance"] == {"run": "test"}
    )
    assert config["parameters"] == sum(p.numel() for p in shift.parameters())
    if name == "mimic":
        assert config["layout"]["layers"] == [0, 2]
    assert (tmp_path / CONFIG).read_text() == json.dumps(config, indent=2, sort_keys=True)
    loaded = load_method(tmp_path, view)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        with attach(model, shift):
            a = model(input_ids=ids, attention_mask=mask).logits
        with attach(model, loaded):
            b = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b) and not torch.equal(a, model(input_ids=ids, attention_mask=mask).logits)


def test_shift_for_another_model_is_refused(tmp_path):
    llava = build_tiny("llava")
    save_method(MimicShift(spec_for(ModelView(llava))), tmp_path, ModelView(llava))
    with pytest.raises(MimicError, match="trained for llava"):
        load_method(tmp_path, ModelView(build_tiny("idefics2")))


def test_tampered_or_missing_weights_give_one_line_errors(tmp_path):
    llava = build_tiny("llava")
    view = ModelView(llava)
    with pytest.raises(MimicError, match="method_config.json is missing"):
        load_method(tmp_path, view)
    save_method(MimicShift(spec_for(view)), tmp_path, view)
    (tmp_path / WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(MimicError, match="cannot read method weights"):
        load_method(tmp_path, view)


def test_load_model_from_local_directory(tmp_path):
    model = build_tiny("qwen2_vl")
    model.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), with_processor=False)
    assert loaded.view.family.name == "qwen2_vl"
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert config_fingerprint(loaded.model.config) == config_fingerprint(model.config)
    assert config_fingerprint(build_tiny("llava").config) != config_fingerprint(model.config)


def test_unknown_inputs_are_clear_errors(tmp_path):
    with pytest.raises(MimicError, match="model directory not found"):
        load_model(str(tmp_path / "nowhere"))
    with pytest.raises(MimicError, match="supported: idefics2, idefics, llava"):
        family_for("gpt2")


def test_geometry_of_each_family(family_name):
    geo = ModelView(build_tiny(family_name)).geometry
    assert (geo.num_layers, geo.num_heads, geo.head_dim, geo.hidden_size) == (3, 4, 8, 32)
    assert geo.num_kv_heads == (4 if family_name == "idefics" else 2)
