"""LIVE (learnable in-context vector), as MimIC's paper re-runs it: one vector per decoder layer added to the MLP
output with a learned per-layer scale, each token rescaled back to its own norm:

    h' = (h + a_l v_l) * ||h|| / ||h + a_l v_l||      v_l ~ N(0, 0.01^2), a_l = 0.1 at the start

Trained with 0.5 CE + KL(teacher || student) on the answer-token logits; the teacher's logits come from the cache
(top-k plus the log-sum-exp, an exact KL over the top-k and the tail; pipeline.training.topk_kl).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.families import ModelView
from pipeline.methods.base import Handle, MethodConfig, Trained, raise_mismatch

DEFAULT = MethodConfig(lr=0.03, weight_decay=1e-3, ce_weight=0.5, align_weight=0.0, kl_weight=1.0)


class Live(Trained):
    name = "live"

    def __init__(self, config: MethodConfig, num_layers: int, hidden_size: int, generator=None):
        super().__init__(config)
        self.v = nn.Parameter(0.01 * torch.randn(num_layers, hidden_size, generator=generator))
        self.scale = nn.Parameter(torch.full((num_layers,), 0.1))
        self.enabled = True

    @classmethod
    def build(cls, name, config, view: ModelView, generator) -> Live:
        return cls(config, view.geometry.num_layers, view.geometry.hidden_size, generator)

    @classmethod
    def rebuild(cls, name, config, layout: dict, view: ModelView) -> Live:
        return cls(config, layout["num_layers"], layout["hidden_size"])

    def layout(self) -> dict:
        return {"num_layers": self.v.shape[0], "hidden_size": self.v.shape[1]}

    def shift_hidden(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """[B, T, hidden] -> the same, shifted and rescaled token by token."""
        shifted = hidden + (self.scale[layer] * self.v[layer]).to(hidden.device, hidden.dtype)
        return shifted * (
            hidden.norm(dim=-1, keepdim=True) / shifted.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        )

    def attach(self, model: nn.Module) -> Handle:
        view = ModelView(model)
        if view.geometry.num_layers != self.v.shape[0] or view.geometry.hidden_size != self.v.shape[1]:
            raise_mismatch(self, view)
        handles = [
            view.site_module(layer, "mlp").register_forward_hook(self._hook(layer))
            for layer in range(len(self.v))
        ]
        return Handle(self, [h.remove for h in handles])

    def _hook(self, layer: int):
        def hook(_module, _args, output):
            return self.shift_hidden(layer, output) if self.enabled else None

        return hook
