"""A trained method on disk, like a peft adapter: `method.safetensors` (only the method's tensors) and
`method_config.json` (method name, its config, its layout, the base model's identity and the prompt it was trained
with), plus what the method writes beside them (peft's own files for LoRA)."""

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

log = logging.getLogger(__name__)
WEIGHTS = "method.safetensors"
CONFIG = "method_config.json"
FORMAT = 2


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save_method(
    method,
    directory,
    view: ModelView,
    provenance: dict | None = None,
    prompt: str | None = None,
    base_weights: str | None = None,
) -> Path:
    """Write the method's tensors and a JSON config that is enough to reload them without the training config:
    the base model's weights fingerprint (`base_weights`, taken before a method that lives in the model was
    attached) and the prompt template it was trained with (it works with that one)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "format": FORMAT,
        "package_version": __version__,
        "method": method.name,
        "config": method.config.to_dict(),
        "layout": method.layout(),
        "parameters": method.num_parameters(),
        "family": view.family.name,
        "model_type": view.model.config.model_type,
        "architecture": type(view.model).__name__,
        "base_model": str(view.model.config.name_or_path),
        "config_fingerprint": config_fingerprint(view.model.config),
        "base_weights": base_weights or weights_fingerprint(view.model),
        "prompt": prompt,
        "geometry": vars(view.geometry),
        "provenance": provenance or {},
    }
    (directory / CONFIG).unlink(missing_ok=True)  # no config until everything it describes is written
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in method.tensors().items()}
    _atomic_write(directory / WEIGHTS, lambda p: save_file(tensors, str(p)))
    method.save_extra(directory, view)
    _atomic_write(directory / CONFIG, lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True)))
    return directory


def read_method_config(directory) -> dict:
    """The JSON config of a saved method, or a one-line error naming what is missing."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise MimicError(f"no trained method in {directory}: {CONFIG} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MimicError(f"{path} is not valid JSON: {err}") from err


def load_method(directory, view: ModelView | None = None, device: str | torch.device = "cpu"):
    """Rebuild a saved method; with `view`, refuse one trained for a model of another family or shape."""
    from pipeline.methods import method_class, parse_method_config

    directory = Path(directory)
    saved = read_method_config(directory)
    if saved.get("format") != FORMAT:
        raise MimicError(
            f"{directory / CONFIG} has format {saved.get('format')}, this version reads {FORMAT}"
        )
    geo = vars(view.geometry) if view is not None else saved["geometry"]
    if view is not None and (view.family.name != saved["family"] or saved["geometry"] != geo):
        raise MimicError(
            f"method in {directory} was trained for {saved['family']} model {saved['base_model']!r} "
            f"({saved['geometry']}); this model is {view.family.name} with {geo}"
        )
    name = saved["method"]
    cls = method_class(name)
    config = parse_method_config(name, saved["config"], f"{directory / CONFIG}: config")
    method = cls.rebuild(name, config, saved["layout"], view)
    method.saved_parameters = saved["parameters"]
    path = directory / WEIGHTS
    try:
        tensors = load_file(str(path), device="cpu")
    except (FileNotFoundError, SafetensorError, OSError) as err:
        raise MimicError(f"cannot read method weights {path}: {err}") from err
    expected = {k: tuple(v) for k, v in method.expected_shapes().items()}
    found = {k: tuple(t.shape) for k, t in tensors.items()}
    if found != expected:
        raise MimicError(f"{path} holds tensors {found}, but its config describes {expected}")
    if tensors:
        method.load_tensors(tensors)
    method.load_extra(directory)
    return method.to(device)


def check_method_base(directory, weights: str | None, prompt: str | None, allow_other: bool = False) -> None:
    """Refuse a method trained on another checkpoint (same geometry, other weights: a base model's shift on its
    instruct sibling) or with another prompt template, unless `allow_other`; one line naming both. `weights`
    None checks the prompt only (before a model is loaded), `prompt` None the weights only."""
    config = read_method_config(directory)
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
            f"method in {directory}: {'; '.join(problems)} (pass --allow-other-base to apply it anyway)"
        )
    for problem in problems:
        log.warning("method in %s: %s (applied anyway: --allow-other-base)", directory, problem)
