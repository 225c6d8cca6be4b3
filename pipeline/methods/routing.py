"""Methods that change attention itself (MimIC's heads, HiFICL's learned key/value pairs) enter through ONE function
registered in transformers' attention-function registry under the name "mimic".

A text self-attention module carries its route as an attribute (`module.mimic_route`): the object that computes
that layer's attention. Modules without a route (vision towers, perceivers, Idefics' gated cross-attention, a
model with nothing attached) get plain SDPA, so routing alone changes no output. Routes live on the modules of
one model: attaching a method to one model never touches another model in the same process.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from pipeline.attention import additive_mask, attention_with_lse
from pipeline.errors import MimicError
from pipeline.families import ModelView

ATTN_NAME = "mimic"
ROUTE = "mimic_route"  # attribute of a routed attention module


class Route:
    """One layer's attention under a method: `shift(query, out, lse, scale)` changes SDPA's output.

    query/out [B, H, T, D] and lse [B, H, T] come from one fused call (q after RoPE, KV heads expanded); while
    the owning method's `enabled` is False the layer gets plain SDPA (compare with and without, no reload).
    """

    def __init__(
        self, owner, shift: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
    ):
        self.owner, self.shift = owner, shift

    @property
    def enabled(self) -> bool:
        return self.owner.enabled


class _MaskCache:
    """The additive float mask of the last boolean mask seen: every layer of one forward shares it."""

    def __init__(self):
        self.key, self.value = None, None

    def get(self, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        if mask is None:
            return None
        if self.key is None or self.key[0] is not mask or self.key[1] != dtype:
            self.key, self.value = (mask, dtype), additive_mask(mask, dtype)
        return self.value


def routed_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """The registered attention function: SDPA, with the route's change for routed, enabled self-attention."""
    route: Route | None = getattr(module, ROUTE, None)
    if route is None or not route.enabled or getattr(module, "is_cross_attention", False):
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
    if kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        raise MimicError("attention methods do not support attention softcapping or position bias")
    if module.training and dropout > 0:
        raise MimicError(
            "attention methods need attention dropout off (call model.eval(); only the method trains)"
        )
    groups = getattr(module, "num_key_value_groups", 1)
    b, h, t, d = query.shape
    scale = scaling if scaling is not None else d**-0.5
    mask = route.masks.get(attention_mask, query.dtype)
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
    out = route.shift(query, out, lse, scale)
    return out.transpose(1, 2).contiguous(), None  # (B, T, H, D)


AttentionInterface.register(ATTN_NAME, routed_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)  # unregistered names get NO padding mask


def _set_text_attention(view: ModelView, name: str) -> None:
    key = view.family.text_config
    view.model.set_attn_implementation({key: name} if key else name)


def route_layers(view: ModelView, routes: dict[int, Route]) -> Callable[[], None]:
    """Install `routes` (decoder layer -> Route) on the text decoder; returns the function that removes them."""
    modules = view.attention_modules()
    taken = [i for i in routes if getattr(modules[i], ROUTE, None) is not None]
    if taken:
        raise MimicError(f"decoder layers {taken} already carry an attention method: remove it first")
    masks = _MaskCache()
    for layer, route in routes.items():
        route.masks = masks
        setattr(modules[layer], ROUTE, route)
    previous = view.text_config._attn_implementation
    _set_text_attention(view, ATTN_NAME)

    def remove() -> None:
        for layer in routes:
            if hasattr(modules[layer], ROUTE):
                delattr(modules[layer], ROUTE)
        if not any(getattr(m, ROUTE, None) for m in modules):
            _set_text_attention(view, previous if previous not in (None, ATTN_NAME) else "sdpa")

    return remove
