"""Load a model and its processor from a local directory, or the embedded default by name. No hub access."""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PretrainedConfig,
)

from pipeline.errors import MimicError, one_line
from pipeline.families import ModelView, family_for

EMBEDDED = "embedded"  # the name of the model that ships inside this package
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


@dataclass
class Loaded:
    """A frozen model in eval mode, its processor (None if not asked for) and its family view."""

    model: torch.nn.Module
    processor: object | None
    view: ModelView
    source: str  # the name or path it was loaded from

    @property
    def device(self) -> torch.device:
        """Where inputs and a method's tensors go: the first parameter's device (with `model.device: auto`
        accelerate's hooks move activations from layer to layer)."""
        return next(self.model.parameters()).device


def resolve_model_path(name_or_path: str) -> Path:
    """`embedded` -> the packaged default; anything else must be a local directory with a config.json."""
    if name_or_path == EMBEDDED:
        from pipeline.embedded import MODEL_DIR

        return MODEL_DIR
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise MimicError(
            f"model directory not found or has no config.json: {path} "
            f"(give a local checkpoint directory or {EMBEDDED!r}; nothing is downloaded)"
        )
    return path


def check_model(
    name_or_path: str, dtype: str = "float32", device: str = "cpu", layers: list[int] | None = None
) -> PretrainedConfig:
    """Everything about the model that can be checked without reading a weight: the directory, its family, the
    dtype, the device, and that `layers` exist in its text decoder. Returns the config."""
    if dtype not in DTYPES:
        raise MimicError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    check_device(device)
    path = resolve_model_path(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise MimicError(f"{path / 'config.json'} cannot be read: {_reason(err)}") from err
    family = family_for(config.model_type)
    text = getattr(config, family.text_config) if family.text_config else config
    count = text.num_hidden_layers
    if layers is not None and any(not 0 <= layer < count for layer in layers):
        raise MimicError(f"extract.layers={layers}: the model has {count} decoder layers (0..{count - 1})")
    return config


def check_device(device: str) -> None:
    """A device that exists here, or one line saying what is missing. `auto` spreads the model over this
    machine's GPUs with accelerate's device map (the CPU when there are none)."""
    if device == "auto":
        return
    try:
        kind = torch.device(device).type
    except RuntimeError as err:
        raise MimicError(f"model.device={device!r} is not a device (cpu, cuda, cuda:1, mps)") from err
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(kind, False):
        raise MimicError(f"model.device={device!r}, but this machine has no {kind} device (use cpu)")
    if kind == "cuda" and (index := torch.device(device).index) is not None:
        if index >= torch.cuda.device_count():
            raise MimicError(f"model.device={device!r}: only {torch.cuda.device_count()} CUDA devices here")


def load_model(
    name_or_path: str, dtype: str = "float32", device: str = "cpu", with_processor: bool = True
) -> Loaded:
    """Load with `from_pretrained(dir)` from local files only; the family is checked before any weight is read."""
    path = resolve_model_path(name_or_path)
    config = check_model(name_or_path, dtype, device)
    processor = load_processor(path, config.model_type) if with_processor else None  # before the weights
    placement = {"device_map": "auto"} if device == "auto" else {}  # accelerate: layers over the GPUs
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=DTYPES[dtype], attn_implementation="sdpa", local_files_only=True, **placement
    )
    model = model if device == "auto" else model.to(device)
    model.eval().requires_grad_(False)
    return Loaded(model, processor, ModelView(model), str(name_or_path))


def load_processor(path: Path, model_type: str):
    """The checkpoint's processor. Qwen2-VL and LLaVA-OneVision processors always build a video processor,
    whose classes need torchvision: without it, the same processor class is loaded without its video part
    (the pipeline never uses video). Any other failure is one line naming the directory, and so is a tokenizer
    that encodes text to nothing (transformers builds an empty one when the tokenizer files are missing)."""
    processor = _load_processor(path, model_type)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or not tokenizer("What is this?", add_special_tokens=False)["input_ids"]:
        raise MimicError(
            f"the tokenizer in {path} is empty: its files (tokenizer.json, tokenizer.model or vocab.json + "
            "merges.txt, with tokenizer_config.json) are missing; copy them from the original checkpoint"
        )
    return processor


def _load_processor(path: Path, model_type: str):
    try:
        return AutoProcessor.from_pretrained(path, local_files_only=True)
    except (ImportError, OSError) as err:
        # ImportError from the video processor class; OSError "Can't load video processor" where the image
        # processor is saved only inside processor_config.json
        if isinstance(err, OSError) and "video processor" not in str(err):
            raise MimicError(f"no usable processor in {path}: {_reason(err)}") from err
        cls = _processor_class(model_type)
        if cls is None or "video_processor" not in inspect.signature(cls.__init__).parameters:
            raise MimicError(
                f"the processor in {path} needs a package that is missing: {_reason(err)}"
            ) from err
        try:
            return _without_video(cls, path)
        except Exception as inner:  # noqa: BLE001 - any failure of a user's files is reported in one line
            raise MimicError(f"no usable processor in {path}: {_reason(inner)}") from inner
    except Exception as err:  # noqa: BLE001
        raise MimicError(f"no usable processor in {path}: {_reason(err)}") from err


def _processor_class(model_type: str):
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    name = PROCESSOR_MAPPING_NAMES.get(model_type)
    return getattr(transformers, name, None) if isinstance(name, str) else None


def _without_video(cls, path: Path):
    """Processor class `cls` built from the image processor and tokenizer saved in `path` and the settings of
    its processor_config.json, without the video processor."""

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        cls.__init__(self, image_processor=image_processor, tokenizer=tokenizer, **kwargs)

    signature = inspect.signature(cls.__init__)
    kept = [p for n, p in signature.parameters.items() if n != "video_processor"]
    __init__.__signature__ = signature.replace(
        parameters=kept
    )  # what transformers reads a processor's parts off
    image_only = type(cls.__name__, (cls,), {"__init__": __init__})
    saved = path / "processor_config.json"
    settings = json.loads(saved.read_text()) if saved.is_file() else {}
    parts = ("self", "image_processor", "tokenizer", "video_processor")
    kwargs = {k: v for k, v in settings.items() if k in signature.parameters and k not in parts}
    images = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return image_only(image_processor=images, tokenizer=tokenizer, **kwargs)


def config_fingerprint(config: PretrainedConfig) -> str:
    """A hash of the architecture-defining config: equal for the same model wherever it is stored."""
    data = config.to_dict()

    def clean(value):
        if isinstance(value, dict):
            return {
                str(k): clean(v)
                for k, v in sorted(value.items())
                if not str(k).startswith("_") and k not in ("transformers_version", "dtype", "torch_dtype")
            }
        return value

    return hashlib.sha256(json.dumps(clean(data), sort_keys=True, default=str).encode()).hexdigest()[:16]


def tokenizer_fingerprint(processor) -> str:
    """A hash of the tokenizer's full definition (vocabulary, merges, normalizer, special tokens)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def weights_fingerprint(model: torch.nn.Module, values_per_tensor: int = 256) -> str:
    """A cheap hash of the weights: every parameter's name, shape and first values (two checkpoints of one
    architecture differ here, and reading 8B weights in full is not needed to tell them apart). Values are
    rounded to bfloat16 first, so one checkpoint loaded in float32 or bfloat16 hashes the same."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        head = param.detach().flatten()[:values_per_tensor].to("cpu", torch.bfloat16).to(torch.float32)
        digest.update(f"{name}{tuple(param.shape)}".encode())
        digest.update(head.numpy().tobytes())
    return digest.hexdigest()[:16]


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {one_line(err)[:300]}"
