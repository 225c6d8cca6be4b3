"""Model families: one row per family says where its text decoder lives and how its prompts mark images.

Adding a model = one row in FAMILIES + one tiny-config test in tests/test_families.py. No other code branches
on the model's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from torch import nn

from pipeline.errors import MimicError

SITES = ("attn", "mlp", "layer")  # recordable per-layer sites: attention output, MLP output, layer output


@dataclass(frozen=True)
class Family:
    """Where an architecture keeps its text decoder, and what its prompts look like."""

    name: str
    model_types: tuple[str, ...]  # `config.model_type` values this row serves
    decoder_layers: str  # dotted path from the top-level model to the ModuleList of text decoder layers
    text_config: str | None  # config attribute holding the text config; None for a flat config (Idefics v1)
    image_placeholder: str  # what stands for one image in prompt text; the processor expands it
    attention: str = "self_attn"  # attribute of a decoder layer: its self-attention module
    mlp: str = "mlp"  # attribute of a decoder layer: its MLP
    output_projection: str = "o_proj"  # attribute of the self-attention module: the heads' output projection
    image_axis: int = 0  # processor image tensors: 0 = one flat list over the batch, 1 = [batch, images, ...]
    # "processor": the processor tokenizes a round's text and expands its placeholders; "tokenizer": the text is
    # tokenized as written (placeholders already expanded) and images go through the image processor alone
    encode: str = "processor"
    # Idefics v1: each token's cross-attention to images ([B, T, images]), rebuilt from the assembled ids
    image_attention_mask: bool = False
    # pass cumsum(attention_mask) - 1 positions, as `generate` does; False where the model derives them from the
    # mask itself (Qwen2-VL's M-RoPE, Idefics v1)
    position_ids: bool = True
    # where the model has no get_image_features: the vision tower RICES embeds with (pixel_values in)
    vision_tower: str | None = None


FAMILIES: tuple[Family, ...] = (
    Family("idefics2", ("idefics2",), "model.text_model.layers", "text_config", "<image>", image_axis=1),
    Family(
        "idefics",
        ("idefics",),
        "model.layers",
        None,
        "<fake_token_around_image><image><fake_token_around_image>",
        image_axis=1,
        encode="tokenizer",
        image_attention_mask=True,
        position_ids=False,
        vision_tower="model.vision_model",
    ),
    Family("llava", ("llava", "llava_onevision"), "model.language_model.layers", "text_config", "<image>"),
    Family(
        "qwen2_vl",
        ("qwen2_vl", "qwen2_5_vl"),
        "model.language_model.layers",
        "text_config",
        "<|vision_start|><|image_pad|><|vision_end|>",
        position_ids=False,
    ),
)


def family_for(model_type: str) -> Family:
    """The row serving `config.model_type`, or an error naming the supported families."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise MimicError(
        f"model type {model_type!r} is not supported (supported: {supported}); "
        "to add one, add a row to FAMILIES in pipeline/families.py"
    )


@dataclass(frozen=True)
class Geometry:
    """Shape of the text decoder's attention, read from the text config."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int


class ModelView:
    """A loaded model seen through its family row: decoder layers, attention geometry and recordable sites."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.family = family_for(model.config.model_type)

    @property
    def text_config(self):
        cfg = self.model.config
        return getattr(cfg, self.family.text_config) if self.family.text_config else cfg

    @cached_property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.family.decoder_layers)

    @cached_property
    def geometry(self) -> Geometry:
        cfg = self.text_config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        return Geometry(len(self.layers), heads, kv_heads, head_dim, cfg.hidden_size)

    @property
    def image_token_id(self) -> int | None:
        """The id that stands for one image feature in the text (None where images are not in the sequence)."""
        return getattr(self.model.config, "image_token_id", None)

    def attention_modules(self) -> list[nn.Module]:
        """The text decoder's self-attention module of every layer, in layer order."""
        return [getattr(layer, self.family.attention) for layer in self.layers]

    def output_projection(self, layer: int) -> nn.Module:
        """The self-attention's output projection of decoder layer `layer`: its input is the heads' outputs."""
        return getattr(self.attention_modules()[layer], self.family.output_projection)

    def site_module(self, layer: int, site: str) -> nn.Module:
        """The module whose output is `site` ("attn", "mlp" or "layer") in decoder layer `layer`."""
        block = self.layers[layer]
        if site == "layer":
            return block
        if site == "attn":
            return getattr(block, self.family.attention)
        if site == "mlp":
            return getattr(block, self.family.mlp)
        raise MimicError(f"unknown site {site!r}: choose one of {', '.join(SITES)}")
