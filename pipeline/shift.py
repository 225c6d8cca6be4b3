"""MimIC shift heads and their injection into a transformers model.

In every chosen decoder layer and head h, for each query token q:

    out_h(q) = SA_h(q, K, V) + mu_h(q) * v_h,   mu_h(q) = Z1 / (Z1 + Z2) = sigmoid(log Z1 - log Z2)
    log Z1 = w_h . q + b_h,                     log Z2 = logsumexp over the keys q attends to of q . k * scale

q and k after rotary embedding, KV heads expanded. `log Z2` comes from the attention kernel itself
(pipeline.attention) with an exact gradient. The shift is injected through transformers' attention-function
registry under the name "mimic": one function that runs the model's SDPA attention and adds the shift for the
modules routed to a shift; everything else (vision towers, perceivers, Idefics cross-attention, shifts switched
off) gets plain SDPA, so a model with shifts attached but disabled computes exactly what it did before.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from pipeline.attention import additive_mask, attention_with_lse
from pipeline.errors import MimicError
from pipeline.families import ModelView

ATTN_NAME = "mimic"
VARIANTS = ("mimic", "shared_vector", "scalar_magnitude", "ffn")


@dataclass(frozen=True)
class ShiftSpec:
    """Everything needed to build (and to validate on load) a set of shift parameters."""

    variant: str  # one of VARIANTS
    layers: tuple[int, ...]  # decoder layers that carry a shift
    num_heads: int
    head_dim: int
    hidden_size: int

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise MimicError(f"unknown shift variant {self.variant!r}: choose one of {', '.join(VARIANTS)}")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter name -> shape ([layers, ...] first)."""
        n, h, d = len(self.layers), self.num_heads, self.head_dim
        if self.variant == "ffn":
            return {"v": (n, self.hidden_size)}
        if self.variant == "shared_vector":  # one (v, w, b) used by every head; mu still per head
            return {"v": (n, 1, d), "w": (n, 1, d), "b": (n, 1)}
        if self.variant == "scalar_magnitude":  # mu(q) replaced by a learned per-head scalar
            return {"v": (n, h, d), "m": (n, h)}
        return {"v": (n, h, d), "w": (n, h, d), "b": (n, h)}

    def to_dict(self) -> dict:
        return asdict(self)


def spec_for(view: ModelView, variant: str = "mimic", layers: tuple[int, ...] | None = None) -> ShiftSpec:
    """The spec of a shift for this model: all decoder layers unless `layers` names a subset."""
    geo = view.geometry
    chosen = tuple(range(geo.num_layers)) if layers is None else tuple(sorted(set(layers)))
    bad = [i for i in chosen if not 0 <= i < geo.num_layers]
    if bad:
        raise MimicError(f"shift layers {bad} out of range: the model has {geo.num_layers} decoder layers")
    return ShiftSpec(variant, chosen, geo.num_heads, geo.head_dim, geo.hidden_size)


class MimicShift(nn.Module):
    """The only trainable tensors of MimIC: `v`, `w`, `b` (or `m`) stacked over the shifted layers."""

    def __init__(self, spec: ShiftSpec, generator: torch.Generator | None = None):
        super().__init__()
        self.spec = spec
        shapes = spec.shapes()
        # The paper's initialisation: v ~ 1e-3 N(0, 1), w ~ N(0, 0.02^2), b = 0.
        self.v = nn.Parameter(1e-3 * torch.randn(shapes["v"], generator=generator))
        if "w" in shapes:
            self.w = nn.Parameter(0.02 * torch.randn(shapes["w"], generator=generator))
            self.b = nn.Parameter(torch.zeros(shapes["b"]))
        if "m" in shapes:
            self.m = nn.Parameter(torch.ones(shapes["m"]))  # magnitude 1: the shift starts as v itself
        self.enabled = True
        self._row = {layer: row for row, layer in enumerate(spec.layers)}

    def row(self, layer: int) -> int | None:
        """Index into the stacked parameters of decoder layer `layer`, or None if it carries no shift."""
        return self._row.get(layer)

    def shift_attention(
        self, row: int, query: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
    ) -> torch.Tensor:
        """out + mu * v for one layer. query/out: [B, H, T, D]; lse: [B, H, T] (float32 for half inputs)."""
        v = self.v[row].to(out.dtype)  # (H|1, D)
        mu = self.magnitude(row, query, lse).to(out.dtype)  # (B|1, H, T|1)
        return out + mu[..., None] * v[None, :, None, :]

    def magnitude(self, row: int, query: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """mu(q) = Z1 / (Z1 + Z2) = sigmoid(w . q + b - lse) as [B, H, T]; the learned scalar [1, H, 1] for the
        scalar_magnitude variant."""
        if self.spec.variant == "scalar_magnitude":
            return self.m[row][None, :, None]
        w, b = self.w[row], self.b[row]  # (H|1, D), (H|1)
        log_z1 = (query.to(w.dtype) @ w.unsqueeze(-1)).squeeze(-1) + b[None, :, None]  # (B, H, T)
        return torch.sigmoid(log_z1 - lse.to(log_z1.dtype))

    def shift_hidden(self, row: int, hidden: torch.Tensor) -> torch.Tensor:
        """LIVE-style shift of an MLP output [B, T, hidden]: add v, then rescale each token to its old norm."""
        shifted = hidden + self.v[row].to(hidden.dtype)
        return shifted * (
            hidden.norm(dim=-1, keepdim=True) / shifted.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        )


# Attention modules routed to a shift: module -> (shift, decoder layer). Weak, so dropping a model frees it.
_ROUTES: weakref.WeakKeyDictionary[nn.Module, tuple[MimicShift, int]] = weakref.WeakKeyDictionary()
_FLOAT_MASK: dict[str, object] = {
    "key": None,
    "value": None,
}  # one-entry cache: the mask is shared by all layers


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None:
        return None
    key = _FLOAT_MASK["key"]
    if key is not None and key[0] is mask and key[1] == dtype:
        return _FLOAT_MASK["value"]
    value = additive_mask(mask, dtype)
    _FLOAT_MASK.update(key=(mask, dtype), value=value)
    return value


def mimic_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """The registered attention function: SDPA, plus the shift for routed, enabled text self-attention."""
    route = _ROUTES.get(module)
    if route is None or not route[0].enabled or getattr(module, "is_cross_attention", False):
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    shift, layer = route
    row = shift.row(layer)
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        raise MimicError("MimIC heads do not support attention softcapping or position bias")
    if module.training and dropout > 0:
        raise MimicError("MimIC heads need attention dropout off (call model.eval(); only shifts train)")
    groups = getattr(module, "num_key_value_groups", 1)
    b, h, t, d = query.shape
    scale = scaling if scaling is not None else d**-0.5
    mask = _float_mask(attention_mask, query.dtype)
    if t == 1 and groups > 1:
        # A decoding step: the `groups` query heads sharing a KV head become rows of one head (rows are
        # independent without a causal rule), so the KV cache is read in place instead of copied per head.
        packed = query.reshape(b, h // groups, groups, d)  # (B, Hkv, g, D)
        out, lse = attention_with_lse(packed, key, value, mask, False, scale)
        out, lse = out.reshape(b, h, 1, d), lse.reshape(b, h, 1)
    else:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # (B, H, S, D)
        s = key.shape[2]
        # The same causal rule as transformers' SDPA path: no mask means causal for a prefill and "attend to
        # every key" for a one-token step; an empty static cache is cropped to the prompt.
        causal = (
            t > 1
            and mask is None
            and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
        )
        if causal and s > t:
            key, value = key[:, :, :t], value[:, :, :t]
        out, lse = attention_with_lse(query, key, value, mask, causal, scale)
    out = shift.shift_attention(row, query, out, lse)
    return out.transpose(1, 2).contiguous(), None  # (B, T, H, D)


AttentionInterface.register(ATTN_NAME, mimic_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)  # unregistered names get NO padding mask


def _set_text_attention(view: ModelView, name: str) -> None:
    key = view.family.text_config
    view.model.set_attn_implementation({key: name} if key else name)


@contextlib.contextmanager
def attach(model: nn.Module, shift: MimicShift) -> Iterator[MimicShift]:
    """Route the model's text decoder through `shift` inside the block; always restored on exit.

    Toggle `shift.enabled` inside the block to compare with and without shifts, no reload needed.
    """
    view = ModelView(model)
    geo = view.geometry
    spec = shift.spec
    if (spec.num_heads, spec.head_dim, spec.hidden_size) != (
        geo.num_heads,
        geo.head_dim,
        geo.hidden_size,
    ) or (max(spec.layers) >= geo.num_layers):
        raise MimicError(
            f"shift of {spec.num_heads} heads x {spec.head_dim} dims, hidden {spec.hidden_size}, layers up to "
            f"{max(spec.layers)} does not fit this model ({geo.num_heads} heads x {geo.head_dim} dims, hidden "
            f"{geo.hidden_size}, {geo.num_layers} layers)"
        )
    handles = []
    previous = view.text_config._attn_implementation
    try:
        if spec.variant == "ffn":
            for layer in spec.layers:
                mlp = view.site_module(layer, "mlp")
                handles.append(mlp.register_forward_hook(_ffn_hook(shift, layer)))
        else:
            for layer, attn in enumerate(view.attention_modules()):
                if shift.row(layer) is not None:
                    _ROUTES[attn] = (shift, layer)
            _set_text_attention(view, ATTN_NAME)
        yield shift
    finally:
        for handle in handles:
            handle.remove()
        for attn in view.attention_modules():
            _ROUTES.pop(attn, None)
        if spec.variant != "ffn":
            _set_text_attention(view, previous or "sdpa")


def _ffn_hook(shift: MimicShift, layer: int):
    row = shift.row(layer)

    def hook(_module, _args, output):
        if not shift.enabled:
            return None
        return shift.shift_hidden(row, output)

    return hook
