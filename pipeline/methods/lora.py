"""LoRA through peft, and MimIC + LoRA (the paper's "compatible with LoRA").

`lora`: peft LoRA r=16, alpha=32, dropout 0.05 on q, k, v and o of the text decoder only; CE. `mimic_lora`:
MimIC's heads plus a rank-1 LoRA on o_proj, trained with MimIC's objective. The LoRA part is saved in peft's own
format (`adapter_config.json`, `adapter_model.safetensors`; `lora/` inside a mimic_lora run), which
`PeftModel.from_pretrained(base_model, directory)` loads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.errors import MimicError
from pipeline.families import ModelView
from pipeline.methods.base import Handle, MethodConfig, Trained
from pipeline.methods.mimic import MimicShift, spec_for

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"


@dataclass(frozen=True)
class LoraMethodConfig(MethodConfig):
    r: int  # LoRA rank
    alpha: int  # LoRA scaling numerator (scale = alpha / r)
    dropout: float  # LoRA dropout on the adapted layers' inputs (training only)
    targets: list[str]  # projection names inside each decoder layer's self-attention

    def __post_init__(self):
        super().__post_init__()
        if self.r < 1 or not 0 <= self.dropout < 1 or not self.targets:
            raise MimicError(
                f"r={self.r}, dropout={self.dropout}, targets={self.targets}: need r >= 1, dropout in [0, 1)"
            )
        unknown = [t for t in self.targets if t not in PROJECTIONS]
        if unknown:
            raise MimicError(
                f"targets {unknown}: LoRA adapts the self-attention projections {', '.join(PROJECTIONS)}"
            )


LORA = LoraMethodConfig(5e-4, 0.0, 1.0, 0.0, 0.0, r=16, alpha=32, dropout=0.05, targets=list(PROJECTIONS))
MIMIC_LORA = LoraMethodConfig(0.03, 1e-3, 0.5, 1.0, 0.0, r=1, alpha=2, dropout=0.05, targets=["o_proj"])


def target_pattern(view: ModelView, targets: list[str]) -> str:
    """peft's target_modules as a full-name regex: the text decoder's self-attention projections only (not the
    vision tower's, not Idefics' cross-attention)."""
    layers = re.escape(view.family.decoder_layers)
    return rf"{layers}\.\d+\.{re.escape(view.family.attention)}\.({'|'.join(map(re.escape, targets))})"


class PeftLora:
    """A LoRA adapter held as peft state-dict tensors; injected into a model with peft while attached.

    The first attach to a model injects peft's LoRA layers (~1 s for the 128 projections of an 8B model); a
    detach puts the original Linear modules back, as peft's unload does, but keeps the LoRA layers, so attaching
    to the same model again only puts them back (evaluation attaches once per chunk of queries). New weights
    (`saved` set), another model or a model moved to another device inject afresh. Parked layers keep their
    model referenced until then."""

    def __init__(self, config: LoraMethodConfig, seed: int):
        self.config, self.seed = config, seed
        self._saved: dict[str, torch.Tensor] | None = (
            None  # peft's state dict; None = peft's own initialisation
        )
        self.peft = None
        self._parked = None  # after a detach: (the model, its PeftModel, its LoRA layers)

    @property
    def saved(self) -> dict[str, torch.Tensor] | None:
        return self._saved

    @saved.setter
    def saved(self, state: dict[str, torch.Tensor] | None) -> None:
        self._saved, self._parked = state, None  # the parked layers hold other weights now

    def peft_config(self, view: ModelView) -> LoraConfig:
        c = self.config
        return LoraConfig(
            r=c.r,
            lora_alpha=c.alpha,
            lora_dropout=c.dropout,
            target_modules=target_pattern(view, c.targets),
            bias="none",
            base_model_name_or_path=str(view.model.config.name_or_path),
        )

    def attach(self, model: nn.Module):
        if self.peft is not None:
            raise MimicError("this LoRA adapter is already attached to a model")
        if self._parked is not None and self._parked[0] is model and _on_one_device(self._parked[2]):
            _, self.peft, layers = self._parked
            for parent, name, layer in layers:
                setattr(parent, name, layer)
        else:
            self._inject(model)
            layers = lora_layers(model)
        self._parked = None
        self.peft.eval()

        def remove():
            self._saved = self.state()
            for parent, name, layer in layers:  # the original Linear modules back in place (peft's unload)
                setattr(parent, name, layer.get_base_layer())
            if hasattr(model, "peft_config"):
                del model.peft_config
            self._parked = (model, self.peft, layers)  # the PeftModel holds the model anyway
            self.peft = None

        return remove

    def _inject(self, model: nn.Module) -> None:
        view = ModelView(model)
        with torch.random.fork_rng(devices=[]):  # peft draws lora_A from the global generator
            torch.manual_seed(self.seed)
            try:
                self.peft = get_peft_model(model, self.peft_config(view))
            except ValueError as err:  # e.g. no module matches the targets in this family
                raise MimicError(f"LoRA on {type(model).__name__}: {str(err).splitlines()[0]}") from err
        if self._saved is not None:
            device = next(model.parameters()).device
            set_peft_model_state_dict(self.peft, {k: v.to(device) for k, v in self._saved.items()})

    def state(self) -> dict[str, torch.Tensor]:
        if self.peft is None:
            return dict(self.saved or {})
        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.peft).items()}

    def parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.peft.named_parameters() if "lora_" in n] if self.peft is not None else []

    def train_mode(self, training: bool) -> None:
        if self.peft is not None:
            for name, module in self.peft.named_modules():
                if name.endswith("lora_dropout.default"):
                    module.train(training)

    def save(self, directory: Path, view: ModelView) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in self.state().items()}, str(directory / PEFT_WEIGHTS))
        self.peft_config(view).save_pretrained(str(directory))

    def load(self, directory: Path) -> None:
        path = directory / PEFT_WEIGHTS
        if not path.is_file():
            raise MimicError(f"no LoRA weights in {directory}: {PEFT_WEIGHTS} is missing")
        self.saved = load_file(str(path))


class Lora(Trained):
    name = "lora"
    Config = LoraMethodConfig

    def __init__(self, config: LoraMethodConfig, seed: int = 0):
        super().__init__(config)
        self.adapter = PeftLora(config, seed)
        self._count = 0

    @classmethod
    def build(cls, name, config, view, generator) -> Lora:
        method = cls(config, int(torch.randint(2**31, (1,), generator=generator)))
        method._count = _lora_count(view, config)
        return method

    @classmethod
    def rebuild(cls, name, config, layout, view) -> Lora:
        method = cls(config)
        method._count = _lora_count(view, config) if view is not None else 0
        return method

    def attach(self, model) -> Handle:
        return Handle(self, [self.adapter.attach(model)])

    def trainable(self):
        return self.adapter.parameters()

    def tensors(self):
        return {}  # the weights are in peft's files

    def num_parameters(self) -> int:
        return self._count or sum(v.numel() for v in self.adapter.state().values())

    def train_mode(self, training: bool) -> None:
        self.adapter.train_mode(training)

    def save_extra(self, directory: Path, view: ModelView) -> None:
        self.adapter.save(directory, view)

    def load_extra(self, directory: Path) -> None:
        self.adapter.load(directory)

    def checkpoint_state(self) -> dict:
        return self.adapter.state()

    def load_checkpoint_state(self, state: dict) -> None:
        if self.adapter.peft is not None:
            set_peft_model_state_dict(self.adapter.peft, state)
        else:
            self.adapter.saved = state


class MimicLora(Trained):
    """MimIC's heads and a rank-1 LoRA on o_proj, attached and saved together."""

    name = "mimic_lora"
    Config = LoraMethodConfig

    def __init__(self, shift: MimicShift, config: LoraMethodConfig, seed: int = 0):
        super().__init__(config)
        self.shift = shift
        self.lora = Lora(config, seed)

    @property
    def enabled(self) -> bool:
        return self.shift.enabled

    @classmethod
    def build(cls, name, config, view, generator) -> MimicLora:
        method = cls(MimicShift(spec_for(view), generator, config), config)
        method.lora = Lora.build("lora", config, view, generator)
        return method

    @classmethod
    def rebuild(cls, name, config, layout, view) -> MimicLora:
        method = cls(MimicShift.rebuild("mimic", config, layout, view), config)
        method.lora = Lora.rebuild("lora", config, layout, view)
        return method

    def layout(self) -> dict:
        return self.shift.layout()

    def expected_shapes(self):
        return {f"shift.{k}": v for k, v in self.shift.expected_shapes().items()}

    def attach(self, model) -> Handle:
        inner = self.shift.attach(model)
        try:
            lora = self.lora.attach(model)
        except Exception:
            inner.remove()
            raise
        return Handle(self, [inner.remove, lora.remove])

    def trainable(self):
        return list(self.shift.parameters()) + self.lora.trainable()

    def tensors(self):
        return {f"shift.{k}": v for k, v in self.shift.state_dict().items()}

    def load_tensors(self, tensors):
        self.shift.load_state_dict({k.removeprefix("shift."): v for k, v in tensors.items()})

    def num_parameters(self) -> int:
        return self.shift.num_parameters() + self.lora.num_parameters()

    def train_mode(self, training):
        self.lora.train_mode(training)

    def save_extra(self, directory: Path, view) -> None:
        self.lora.save_extra(directory / "lora", view)

    def load_extra(self, directory: Path) -> None:
        self.lora.load_extra(directory / "lora")

    def checkpoint_state(self) -> dict:
        return {**self.tensors(), **{f"lora.{k}": v for k, v in self.lora.checkpoint_state().items()}}

    def load_checkpoint_state(self, state: dict) -> None:
        self.load_tensors({k: v for k, v in state.items() if k.startswith("shift.")})
        self.lora.load_checkpoint_state({k[5:]: v for k, v in state.items() if k.startswith("lora.")})


def _on_one_device(layers) -> bool:
    """The parked layers' LoRA weights still sit with their base layers (the model was not moved since)."""
    return all(len({p.device for p in layer.parameters()}) == 1 for _, _, layer in layers)


def lora_layers(model: nn.Module) -> list[tuple[nn.Module, str, BaseTunerLayer]]:
    """(parent, attribute, layer) of each outermost peft layer in `model`."""
    found: list[tuple[str, BaseTunerLayer]] = []
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and not any(name.startswith(f"{n}.") for n, _ in found):
            found.append((name, module))
    return [(model.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2], m) for n, m in found]


def _lora_count(view: ModelView, config: LoraMethodConfig) -> int:
    """r x (in + out) for every targeted projection of the text decoder."""
    pattern = re.compile(target_pattern(view, config.targets))
    return sum(
        config.r * (m.in_features + m.out_features)
        for name, m in view.model.named_modules()
        if isinstance(m, nn.Linear) and pattern.fullmatch(name)
    )
