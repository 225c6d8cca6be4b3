"""Shift weights on disk, like a peft view: `shift.safetensors` (only shift tensors) + `shift_config.json`."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline import __version__
from pipeline.errors import MimicError
from pipeline.families import ModelView
from pipeline.models import config_fingerprint, weights_fingerprint
from pipeline.shift import MimicShift, ShiftSpec

log = logging.getLogger(__name__)
WEIGHTS = "shift.safetensors"
CONFIG = "shift_config.json"
FORMAT = 1


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save_shift(
    shift: MimicShift,
    directory: str | Path,
    view: ModelView,
    provenance: dict | None = None,
    prompt: str | None = None,
) -> Path:
    """Write the shift tensors and a JSON config that is enough to reload them without the training config:
    the base model's weights fingerprint and the prompt template it was trained with (it works with that one)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "format": FORMAT,
        "package_version": __version__,
        "family": view.family.name,
        "model_type": view.model.config.model_type,
        "architecture": type(view.model).__name__,
        "base_model": str(view.model.config.name_or_path),
        "config_fingerprint": config_fingerprint(view.model.config),
        "base_weights": weights_fingerprint(view.model),
        "prompt": prompt,
        "num_layers": view.geometry.num_layers,
        "spec": shift.spec.to_dict(),
        "provenance": provenance or {},
    }
    tensors = {name: p.detach().to("cpu", torch.float32).contiguous() for name, p in shift.named_parameters()}
    # Weights first, config last: a directory with a config always has its weights.
    _atomic_write(directory / WEIGHTS, lambda p: save_file(tensors, str(p)))
    _atomic_write(directory / CONFIG, lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True)))
    return directory


def read_shift_config(directory: str | Path) -> dict:
    """The JSON config of a saved shift, or a one-line error naming what is missing."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise MimicError(f"no trained shift in {directory}: {CONFIG} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MimicError(f"{path} is not valid JSON: {err}") from err


def load_shift(
    directory: str | Path, view: ModelView | None = None, device: str | torch.device = "cpu"
) -> MimicShift:
    """Rebuild a saved shift; with `view`, refuse one trained for a model of another family or shape."""
    config = read_shift_config(directory)
    spec = ShiftSpec(**{**config["spec"], "layers": tuple(config["spec"]["layers"])})
    if view is not None:
        geo = view.geometry
        if view.family.name != config["family"] or (
            spec.num_heads,
            spec.head_dim,
            spec.hidden_size,
            config["num_layers"],
        ) != (geo.num_heads, geo.head_dim, geo.hidden_size, geo.num_layers):
            raise MimicError(
                f"shift in {directory} was trained for {config['family']} model {config['base_model']!r} "
                f"({config['num_layers']} layers, {spec.num_heads} heads x {spec.head_dim}); this model is "
                f"{view.family.name} with {geo.num_layers} layers, {geo.num_heads} heads x {geo.head_dim}"
            )
    path = Path(directory) / WEIGHTS
    try:
        tensors = load_file(str(path), device=str(device))
    except (FileNotFoundError, SafetensorError, OSError) as err:
        raise MimicError(f"cannot read shift weights {path}: {err}") from err
    shift = MimicShift(spec).to(device)
    expected = {name: tuple(shape) for name, shape in spec.shapes().items()}
    found = {name: tuple(t.shape) for name, t in tensors.items()}
    if found != expected:
        raise MimicError(f"{path} holds tensors {found}, but its config describes {expected}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            getattr(shift, name).copy_(tensor)
    return shift


def check_shift_base(
    directory: str | Path, weights: str | None, prompt: str | None, allow_other: bool = False
) -> None:
    """Refuse a shift trained on another checkpoint (same geometry, other weights: a base model's shift on its
    instruct sibling) or with another prompt template, unless `allow_other`; one line naming both. `weights`
    None checks the prompt only (before a model is loaded), `prompt` None the weights only."""
    config = read_shift_config(directory)
    problems = []
    if weights is not None and config.get("base_weights") not in (None, weights):
        problems.append(
            f"it was trained on model {config.get('base_model')!r} (weights {config['base_weights']}), this "
            f"model's weights are {weights}"
        )
    if prompt is not None and config.get("prompt") not in (None, prompt):
        problems.append(f"it was trained with the prompt {config['prompt']!r}, this run uses {prompt!r}")
    if problems and not allow_other:
        raise MimicError(
            f"shift in {directory}: {'; '.join(problems)} (pass --allow-other-base to apply it anyway)"
        )
    for problem in problems:
        log.warning("shift in %s: %s (applied anyway: --allow-other-base)", directory, problem)
