"""RICES: neighbours by cosine similarity of image embeddings, from the model's own vision tower or a local
encoder directory; the query never demonstrates itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from real_checkpoints import save_tiny_checkpoint

from pipeline.data import Item
from pipeline.errors import MimicError
from pipeline.models import load_model
from pipeline.rices import encoder_directory, nearest_sets, own_vision_tower


def coloured(i: int, colour) -> Item:
    return Item(f"item{i}", (Image.new("RGB", (20 + i, 16), colour),), "what colour?", ("x",))


def test_nearest_sets_rank_by_cosine_and_skip_the_query_itself():
    vectors = {
        f"item{i}": torch.tensor(v, dtype=torch.float)
        for i, v in enumerate([[1, 0], [0.9, 0.1], [0, 1], [0.7, 0.7], [-1, 0]])
    }
    items = [coloured(i, (0, 0, 0)) for i in range(5)]

    def embed(batch):
        return F.normalize(torch.stack([vectors[i.id] for i in batch]), dim=-1)

    sets = nearest_sets(items[:1], items, k=2, m=2, embed=embed)  # the query is in the support set
    assert sets == [[[1, 3], [2, 4]]]  # by cosine to [1, 0]: item1, item3, then item2, item4; never item0
    with pytest.raises(MimicError, match="neighbours per query"):
        nearest_sets(items[:1], items, k=3, m=2, embed=embed)


@pytest.mark.parametrize("family", ["llava", "idefics2", "qwen2_vl"])
def test_own_vision_tower_embeddings_are_its_image_features(tmp_path, family):
    loaded = load_model(str(save_tiny_checkpoint(family, tmp_path / family)))
    items = [coloured(i, c) for i, c in enumerate([(250, 0, 0), (240, 10, 10), (0, 0, 250)])]
    embed = own_vision_tower(loaded)
    got = embed(items)
    inputs = loaded.processor.image_processor(images=[items[2].images[0]], return_tensors="pt")
    kwargs = {
        k: v
        for k, v in inputs.items()
        if k in ("pixel_values", "pixel_attention_mask", "image_grid_thw", "image_sizes")
    }
    with torch.no_grad():
        out = loaded.model.get_image_features(**kwargs).pooler_output
    out = torch.cat([o.reshape(-1, o.shape[-1]) for o in out]) if isinstance(out, (list, tuple)) else out
    want = F.normalize(out.reshape(-1, out.shape[-1]).float().mean(0), dim=-1)
    assert torch.allclose(got[2], want, atol=1e-5) and got.shape[0] == 3
    assert torch.allclose(got.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_encoder_directory_uses_clip_image_embeds(tmp_path):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=8)  # fmt: skip
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "clip"
    )
    items = [coloured(i, c) for i, c in enumerate([(250, 0, 0), (0, 250, 0)])]
    got = encoder_directory(str(tmp_path / "clip"), "cpu")(items)
    model = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "clip")
    pixels = CLIPImageProcessor.from_pretrained(tmp_path / "clip")(
        images=[items[1].images[0]], return_tensors="pt"
    )
    with torch.no_grad():
        want = F.normalize(model(**pixels).image_embeds[0], dim=-1)
    assert got.shape == (2, 8) and torch.allclose(got[1], want, atol=1e-5)
    with pytest.raises(MimicError, match="no encoder directory"):
        encoder_directory(str(tmp_path / "nowhere"), "cpu")


def test_the_teacher_takes_the_nearest_demonstrations_with_extract_icd_rices():
    from conftest import ROOT, SMALL

    from pipeline.config import load_params
    from pipeline.rices import image_embedder
    from pipeline.samples import teacher_samples
    from pipeline.splits import make_splits

    params = load_params(ROOT / "params.yaml", [*SMALL, "extract.icd=rices", "extract.m=2"])
    loaded = load_model("embedded")
    splits = make_splits(params.data)
    samples = teacher_samples(splits, params.extract, loaded, None, "cpu")
    embed = image_embedder(loaded, None, "cpu")
    want = nearest_sets(splits.train, splits.support, params.extract.k, 2, embed)
    assert samples.icd_sets == want and len(want[0]) == 2
    similarity = embed(splits.train[:1]) @ embed(splits.support).T
    nearest = samples.icd_sets[0][0]
    others = [i for i in range(len(splits.support)) if i not in nearest]
    assert similarity[0, nearest].min() >= similarity[0, others].max()  # set 0: the k most similar images


@pytest.mark.parametrize("stage", ["extract", "train", "evaluate"])
def test_a_missing_rices_encoder_is_refused_before_the_model_is_read(stage, tmp_path, monkeypatch):
    import importlib

    from conftest import ROOT, SMALL

    from pipeline.errors import MimicError

    module = importlib.import_module(f"stages.{stage}")
    monkeypatch.setattr(module, "load_model", lambda *a, **k: pytest.fail("the model was read first"))
    settings = [*SMALL, f"data.rices_encoder={tmp_path / 'clip'}", "extract.icd=rices"]
    run = {
        "extract": lambda: module.extract(ROOT / "params.yaml", tmp_path / "t.zarr", settings),
        "train": lambda: module.train(ROOT / "params.yaml", None, tmp_path / "run", settings),  # online
        "evaluate": lambda: module.evaluate(
            ROOT / "params.yaml", [], tmp_path / "m.json", tmp_path / "p.jsonl", settings
        ),
    }[stage]
    with pytest.raises(MimicError, match=f"data.rices_encoder: no encoder directory at {tmp_path / 'clip'}"):
        run()
    (tmp_path / "clip").mkdir()
    with pytest.raises(MimicError, match="has no config.json"):
        run()
