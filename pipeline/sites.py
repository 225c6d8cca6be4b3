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
