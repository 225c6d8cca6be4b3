"""Record per-layer hidden states at a chosen site (attention output, MLP output or layer output)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from pipeline.errors import MimicError
from pipeline.families import SITES, ModelView


def _hidden(output) -> torch.Tensor:
    """The hidden-state tensor of a module output: attention modules return (hidden, weights)."""
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def record_sites(
    view: ModelView, site: str, layers: Sequence[int] | None = None
) -> Iterator[dict[int, torch.Tensor]]:
    """Inside the block, every forward fills `{layer: [B, T, hidden]}` with the site's output (graph kept, so a
    loss on it trains the shifts). The hooks are always removed on exit."""
    if site not in SITES:
        raise MimicError(f"unknown site {site!r}: choose one of {', '.join(SITES)}")
    chosen = range(view.geometry.num_layers) if layers is None else layers
    recorded: dict[int, torch.Tensor] = {}
    handles = []

    def hook_for(layer: int):
        def hook(_module, _args, output):
            recorded[layer] = _hidden(output)

        return hook

    try:
        for layer in chosen:
            handles.append(view.site_module(layer, site).register_forward_hook(hook_for(layer)))
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def record_last_token(view: ModelView, positions: torch.Tensor) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Inside the block, a forward fills `{"hidden": [L x [B, hidden]], "heads": [L x [B, heads x head_dim]]}`:
    every decoder layer's output and its attention heads' outputs (o_proj's input) at position positions[b] of
    row b only (the task- and function-vector signals), sliced in the hooks so no full sequence is kept."""
    recorded: dict[str, list] = {"hidden": [None] * len(view.layers), "heads": [None] * len(view.layers)}
    rows = torch.arange(len(positions))
    handles = []

    def layer_hook(layer: int):
        def hook(_module, _args, output):
            h = _hidden(output)
            recorded["hidden"][layer] = h[rows.to(h.device), positions.to(h.device)]

        return hook

    def heads_hook(layer: int):
        def hook(_module, args):
            x = args[0]
            recorded["heads"][layer] = x[rows.to(x.device), positions.to(x.device)]

        return hook

    try:
        for layer, block in enumerate(view.layers):
            handles.append(block.register_forward_hook(layer_hook(layer)))
            handles.append(view.output_projection(layer).register_forward_pre_hook(heads_hook(layer)))
        yield recorded
    finally:
        for handle in handles:
            handle.remove()
