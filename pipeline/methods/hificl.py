"""HiFICL (CVPR 2026), as its authors' code implements it: in every decoder layer and head, 8 learned key/value
pairs that every query attends to together with the real keys (no rotary embedding on them), each side a
rank-8 product with the value factor starting at zero. Trained with CE only: no teacher.

    K_h = A_h B_h, V_h = C_h D_h          A, C [pairs, rank]; B, D [rank, head_dim]; D = 0 at the start
    out = softmax over [real keys; K_h] of the scores, applied to [V; V_h]
        = SA * Z / (Z + Z') + softmax(q K_h^T * scale) V_h * Z' / (Z + Z')

with Z over the real keys (the fused kernel's log-sum-exp, exact gradient) and Z' over the learned ones. Even
with V_h = 0 the output is not SA: the learned keys take their share Z' / (Z + Z') of the attention.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.families import ModelView
from pipeline.methods.base import Handle, MethodConfig, Trained, raise_mismatch
from pipeline.methods.routing import Route, route_layers

DEFAULT = MethodConfig(lr=0.005, weight_decay=1e-3, ce_weight=1.0, align_weight=0.0, kl_weight=0.0)
PAIRS, RANK = 8, 8


class HiFICL(Trained):
    name = "hificl"

    def __init__(self, config, num_layers: int, num_heads: int, head_dim: int, generator=None):
        super().__init__(config)
        shape = (num_layers, num_heads)
        self.key_a = nn.Parameter(torch.randn(*shape, PAIRS, RANK, generator=generator))
        self.key_b = nn.Parameter(0.01 * torch.randn(*shape, RANK, head_dim, generator=generator))
        self.value_a = nn.Parameter(torch.randn(*shape, PAIRS, RANK, generator=generator))
        self.value_b = nn.Parameter(torch.zeros(*shape, RANK, head_dim))
        self.enabled = True

    @classmethod
    def build(cls, name, config, view: ModelView, generator) -> HiFICL:
        g = view.geometry
        return cls(config, g.num_layers, g.num_heads, g.head_dim, generator)

    @classmethod
    def rebuild(cls, name, config, layout: dict, view: ModelView) -> HiFICL:
        return cls(config, layout["num_layers"], layout["num_heads"], layout["head_dim"])

    def layout(self) -> dict:
        n, h, _, d = self.key_b.shape
        return {"num_layers": n, "num_heads": h, "head_dim": d}

    def pairs(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The learned keys and values of a layer: [H, pairs, head_dim] each."""
        return self.key_a[layer] @ self.key_b[layer], self.value_a[layer] @ self.value_b[layer]

    def extend(self, layer: int, query, out, lse, scale: float) -> torch.Tensor:
        """Attention over the real and the learned keys from SA's output and log-sum-exp. query/out [B, H, T, D]."""
        work = torch.float64 if query.dtype == torch.float64 else torch.float32
        keys, values = (t.to(query.device) for t in self.pairs(layer))  # (H, P, D), on the layer's device
        with torch.autocast(query.device.type, enabled=False):  # the softmax statistics in float32
            scores = (query.to(work) @ keys.to(work).transpose(-1, -2)) * scale  # (B, H, T, P)
            learned = torch.logsumexp(scores, -1)  # (B, H, T)
            total = torch.logaddexp(lse.to(work), learned)
            real_share = torch.exp(lse.to(work) - total).to(out.dtype)[..., None]
            weights = torch.exp(scores - total[..., None]).to(out.dtype)  # (B, H, T, P)
        return out * real_share + weights @ values.to(out.dtype)

    def attach(self, model: nn.Module) -> Handle:
        view = ModelView(model)
        g = view.geometry
        if (g.num_layers, g.num_heads, g.head_dim) != tuple(self.layout().values()):
            raise_mismatch(self, view)
        routes = {
            layer: Route(self, lambda q, o, lse, scale, layer=layer: self.extend(layer, q, o, lse, scale))
            for layer in range(g.num_layers)
        }
        return Handle(self, [route_layers(view, routes)])
