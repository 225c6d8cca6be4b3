"""MimIC's shift heads and the paper's two ablations of mu.

In every chosen decoder layer and head h, for each query token q:

    out_h(q) = SA_h(q, K, V) + mu_h(q) * v_h,   mu_h(q) = Z1 / (Z1 + Z2) = sigmoid(log Z1 - log Z2)
    log Z1 = w_h . q + b_h,                     log Z2 = logsumexp over the keys q attends to of q . k * scale

q and k after rotary embedding, KV heads expanded. `log Z2` comes from the attention kernel itself
(pipeline.attention) with an exact gradient; the heads enter through pipeline.methods.routing.

Variants (registry names):
- `mimic`: the above.
- `head_sharing_mu`: one mu per layer and token, shared by the heads: log Z1 = sum_h w_h . q_h + b and
  log Z2 = mean_h log Z2_h, as the reference code's single-head flag computes them (v stays per head).
- `query_sharing_mu`: one learned mu_h = sigmoid(m_h) per head, the same for every query (no w, b).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from pipeline.errors import MimicError
from pipeline.families import ModelView
from pipeline.methods.base import Handle, MethodConfig, Trained
from pipeline.methods.routing import Route, route_layers

VARIANTS = ("mimic", "head_sharing_mu", "query_sharing_mu")


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
        if self.variant == "query_sharing_mu":
            return {"v": (n, h, d), "m": (n, h)}
        if self.variant == "head_sharing_mu":
            return {"v": (n, h, d), "w": (n, h, d), "b": (n, 1)}
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


DEFAULT = MethodConfig(lr=0.03, weight_decay=1e-3, ce_weight=0.5, align_weight=1.0, kl_weight=0.0)


class MimicShift(Trained):
    """The only trainable tensors of MimIC: `v`, `w`, `b` (or `m`) stacked over the shifted layers."""

    name = "mimic"

    def __init__(
        self, spec: ShiftSpec, generator: torch.Generator | None = None, config: MethodConfig = DEFAULT
    ):
        super().__init__(config)
        self.spec = spec
        self.name = spec.variant
        shapes = spec.shapes()
        # The paper's initialisation: v ~ 1e-3 N(0, 1), w ~ N(0, 0.02^2), b = 0.
        self.v = nn.Parameter(1e-3 * torch.randn(shapes["v"], generator=generator))
        if "w" in shapes:
            self.w = nn.Parameter(0.02 * torch.randn(shapes["w"], generator=generator))
            self.b = nn.Parameter(torch.zeros(shapes["b"]))
        if "m" in shapes:
            self.m = nn.Parameter(torch.zeros(shapes["m"]))  # mu = 0.5 for every query at the start
        self.enabled = True
        self._row = {layer: row for row, layer in enumerate(spec.layers)}

    @classmethod
    def build(
        cls, name: str, config: MethodConfig, view: ModelView, generator: torch.Generator
    ) -> MimicShift:
        return cls(spec_for(view, name), generator, config)

    @classmethod
    def rebuild(cls, name: str, config: MethodConfig, layout: dict, view: ModelView) -> MimicShift:
        return cls(ShiftSpec(**{**layout, "layers": tuple(layout["layers"])}), None, config)

    def layout(self) -> dict:
        return self.spec.to_dict()

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return self.spec.shapes()

    def row(self, layer: int) -> int | None:
        """Index into the stacked parameters of decoder layer `layer`, or None if it carries no shift."""
        return self._row.get(layer)

    def shift_attention(
        self, row: int, query: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
    ) -> torch.Tensor:
        """out + mu * v for one layer. query/out: [B, H, T, D]; lse: [B, H, T] (float32 for half inputs)."""
        v = self.v[row].to(out.device, out.dtype)  # (H, D), on the layer's device (model.device: auto)
        mu = self.magnitude(row, query, lse).to(out.dtype)  # (B|1, H|1, T|1)
        return out + mu[..., None] * v[None, :, None, :]

    def magnitude(self, row: int, query: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """mu as [B, H, T] (mimic), [B, 1, T] (head_sharing_mu) or [1, H, 1] (query_sharing_mu), computed in
        float32 (float64 for float64 inputs) whatever the input dtype or autocast: log Z1 - log Z2 is a small
        difference of large numbers, and bf16 would move mu by percents."""
        work = torch.float64 if query.dtype == torch.float64 else torch.float32
        with torch.autocast(query.device.type, enabled=False):
            return self._magnitude(row, query.to(work), lse.to(work))

    def _magnitude(self, row: int, query: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        if self.spec.variant == "query_sharing_mu":
            return torch.sigmoid(self.m[row].to(query.device, query.dtype))[None, :, None]
        w, b = (
            self.w[row].to(query.device, query.dtype),
            self.b[row].to(query.device, query.dtype),
        )  # (H, D), (H|1)
        per_head = (query @ w.unsqueeze(-1)).squeeze(-1)  # (B, H, T)
        if self.spec.variant == "head_sharing_mu":
            log_z1 = per_head.sum(1, keepdim=True) + b[None, :, None]  # (B, 1, T)
            log_z2 = lse.to(log_z1.dtype).mean(
                1, keepdim=True
            )  # the heads' mean log Z2, as the reference code
            return torch.sigmoid(log_z1 - log_z2)
        log_z1 = per_head + b[None, :, None]  # (B, H, T)
        return torch.sigmoid(log_z1 - lse.to(log_z1.dtype))

    def attach(self, model: nn.Module) -> Handle:
        """Route the model's text decoder through this shift until the handle is removed.

        Toggle `enabled` while attached to compare with and without the shift, no reload needed.
        """
        view = ModelView(model)
        check_fits(self.spec, view)
        routes = {
            layer: Route(self, lambda q, o, lse, _scale, row=row: self.shift_attention(row, q, o, lse))
            for row, layer in enumerate(self.spec.layers)
        }
        return Handle(self, [route_layers(view, routes)])


def check_fits(spec: ShiftSpec, view: ModelView) -> None:
    geo = view.geometry
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


def attach(model: nn.Module, method: Trained) -> Handle:
    """`method.attach(model)`: a handle, usable as `with attach(model, shift): ...`."""
    return method.attach(model)
