"""RICES: the demonstrations whose images are most similar to the query's (cosine similarity of image embeddings).

The embeddings come from a local vision encoder directory (`data.rices_encoder`, e.g. a CLIP checkpoint saved
with `save_pretrained`) or, by default, from the model's own vision tower (`get_image_features`, mean over its
patch features). A query's m sets are its ranked neighbours cut in groups of k: set 0 the k nearest, set 1 the
next k, ... (one set, the nearest k, for evaluation). Used by `evaluate.methods: [rices]` and by the teacher
with `extract.icd: rices`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.data import Item, load_image
from pipeline.errors import MimicError

log = logging.getLogger(__name__)
Embed = Callable[[Sequence[Item]], torch.Tensor]  # items -> [n, d], unit norm


def _pooled(output) -> torch.Tensor:
    """One vector per image call: the mean over patches of whatever the encoder returns."""
    for key in ("image_embeds", "pooler_output", "last_hidden_state"):
        value = getattr(output, key, None)
        if value is not None:
            output = value
            break
    if isinstance(output, (list, tuple)):
        output = torch.cat([o.reshape(-1, o.shape[-1]) for o in output])
    return output.reshape(-1, output.shape[-1]).float().mean(0)


def own_vision_tower(loaded) -> Embed:
    """Embeddings from the loaded model's vision tower, its image processor preparing each image."""
    model, images = loaded.model, getattr(loaded.processor, "image_processor", None)
    features = getattr(model, "get_image_features", None)
    if features is None and loaded.view.family.vision_tower:
        features = model.get_submodule(loaded.view.family.vision_tower)
    if features is None or images is None:
        raise MimicError(
            f"{type(model).__name__} has no get_image_features: set data.rices_encoder to a local vision encoder"
        )
    accepted = set(inspect.signature(getattr(features, "forward", features)).parameters)
    device = next(model.parameters()).device

    def embed_one(item: Item) -> torch.Tensor:
        inputs = images(images=[load_image(item.images[0])], return_tensors="pt")
        inputs = {"pixel_values": inputs} if isinstance(inputs, torch.Tensor) else dict(inputs)
        kwargs = {
            k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items() if k in accepted
        }
        if "pixel_values" in kwargs:
            kwargs["pixel_values"] = kwargs["pixel_values"].to(model.dtype)
        with torch.no_grad():
            return _pooled(features(**kwargs)).cpu()

    return _batched(embed_one)


def check_encoder(path: str | None) -> None:
    """Before any model is read: a given encoder directory exists and has a config.json (None: the model's own
    vision tower)."""
    if path is None:
        return
    if not Path(path).is_dir():
        raise MimicError(f"data.rices_encoder: no encoder directory at {path}")
    if not (Path(path) / "config.json").is_file():
        raise MimicError(
            f"data.rices_encoder: {path} has no config.json (a save_pretrained directory is needed)"
        )


def encoder_directory(path: str, device) -> Embed:
    """Embeddings from a vision encoder saved with `save_pretrained` (CLIP's image_embeds where it has them)."""
    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    check_encoder(path)
    try:
        processor = AutoImageProcessor.from_pretrained(path)
        architectures = AutoConfig.from_pretrained(path).architectures or []
        cls = (
            getattr(transformers, architectures[0], AutoModel) if architectures else AutoModel
        )  # with projection
        encoder = cls.from_pretrained(path).to(device).eval()
    except (OSError, ValueError) as err:
        raise MimicError(f"data.rices_encoder: cannot load {path}: {str(err).splitlines()[0]}") from err

    def embed_one(item: Item) -> torch.Tensor:
        pixels = processor(images=[load_image(item.images[0])], return_tensors="pt")["pixel_values"].to(
            device
        )
        with torch.no_grad():
            if hasattr(encoder, "get_image_features"):
                return _pooled(encoder.get_image_features(pixel_values=pixels)).cpu()
            return _pooled(encoder(pixel_values=pixels)).cpu()

    return _batched(embed_one)


def _batched(embed_one: Callable[[Item], torch.Tensor]) -> Embed:
    cache: dict[str, torch.Tensor] = {}

    def embed(items: Sequence[Item]) -> torch.Tensor:
        for item in tqdm([i for i in items if i.id not in cache], desc="rices embeddings", leave=False):
            if not item.images:
                raise MimicError(f"RICES ranks by image, but item {item.id!r} has none")
            cache[item.id] = embed_one(item)
        return F.normalize(torch.stack([cache[i.id] for i in items]), dim=-1)

    return embed


def image_embedder(loaded, encoder: str | None, device) -> Embed:
    return own_vision_tower(loaded) if encoder is None else encoder_directory(encoder, device)


def nearest_sets(queries: Sequence[Item], support: Sequence[Item], k: int, m: int, embed: Embed) -> list:
    """For each query, m sets of k support indices: its ranked neighbours (itself excluded) in groups of k.
    [queries][m][k], the shape pipeline.icd.sample_icd_sets returns."""
    if m * k > len(support) - 1:
        raise MimicError(
            f"RICES needs m x k = {m * k} neighbours per query, the support set has {len(support)}"
        )
    similarity = embed(queries) @ embed(support).T  # (Q, S)
    own = torch.tensor([[s.id == q.id for s in support] for q in queries])
    ranked = torch.sort(
        similarity.masked_fill(own, float("-inf")), dim=-1, descending=True, stable=True
    ).indices
    return [[ranked[i, s * k : (s + 1) * k].tolist() for s in range(m)] for i in range(len(queries))]
