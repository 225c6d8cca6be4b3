"""What every trained method is (peft's tuners are the model): a config dataclass, a module holding only the
method's tensors, `attach` on a loaded model returning a removable handle that is also a context manager, a
parameter count, and saving in its own safetensors + JSON format (pipeline.methods.io)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from torch import nn

from pipeline.errors import MimicError
from pipeline.families import ModelView


class Handle:
    """What `attach` returns: `remove()` undoes the attachment (idempotent); `with method.attach(model):` too."""

    def __init__(self, method: Trained, removers: list[Callable[[], None]]):
        self.method, self._removers = method, list(removers)

    def remove(self) -> None:
        while self._removers:
            self._removers.pop()()

    def __enter__(self) -> Trained:
        return self.method

    def __exit__(self, *exc) -> None:
        self.remove()


@dataclass(frozen=True)
class MethodConfig:
    """The objective and optimizer of a gradient-trained method (its own section of params.yaml `methods`)."""

    lr: float  # AdamW learning rate
    weight_decay: float  # AdamW
    ce_weight: float  # weight of the answer-token cross-entropy
    align_weight: float  # weight of the layer-wise MSE to the cached teacher states (0: states not read)
    kl_weight: float  # weight of KL(teacher || student) on answer-token logits (0: logits not read)

    def __post_init__(self):
        if not 0 < self.lr < math.inf:
            raise MimicError(f"lr={self.lr}: must be positive")
        weights = {k: getattr(self, k) for k in ("weight_decay", "ce_weight", "align_weight", "kl_weight")}
        low = [f"{k}={v}" for k, v in weights.items() if not 0 <= v < math.inf]
        if low:
            raise MimicError(f"{', '.join(low)}: must be at least 0")
        if self.ce_weight + self.align_weight + self.kl_weight == 0:
            raise MimicError("ce_weight, align_weight and kl_weight are all 0: nothing to train")

    def to_dict(self) -> dict:
        return asdict(self)


class Trained(nn.Module):
    """A method with learned tensors. Subclasses set `name`, `Config` and implement `attach`."""

    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    fitted: ClassVar[bool] = False  # True: fitted from the cache in one pass (tv, fv), no gradient steps

    def __init__(self, config: MethodConfig):
        super().__init__()
        self.config = config

    @classmethod
    def build(cls, name: str, config: MethodConfig, view: ModelView, generator: torch.Generator) -> Trained:
        """A fresh, initialised method for this model (`generator` draws every random initial value)."""
        raise NotImplementedError

    @classmethod
    def rebuild(cls, name: str, config: MethodConfig, layout: dict, view: ModelView) -> Trained:
        """The method as saved (`layout()` of the saved one), its tensors to be loaded."""
        raise NotImplementedError

    def layout(self) -> dict:
        """JSON-able shapes and placement: what `rebuild` needs beside the config."""
        return {}

    def attach(self, model: nn.Module) -> Handle:
        raise NotImplementedError

    def trainable(self) -> list[nn.Parameter]:
        """The tensors the optimizer steps (while attached, for methods whose tensors live in the model)."""
        return [p for p in self.parameters() if p.requires_grad]

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """What is saved: name -> tensor."""
        return {k: v for k, v in self.state_dict().items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(tensors)

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.tensors().items()}

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Everything a resumed run needs (tensors in the model included)."""
        return self.state_dict()

    def load_checkpoint_state(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(state)

    def save_extra(self, directory, view: ModelView) -> None:
        """Files beside ours (peft's format for LoRA)."""

    def load_extra(self, directory) -> None:
        """Read what `save_extra` wrote."""

    def train_mode(self, training: bool) -> None:
        """Switch the method's own stochastic parts (LoRA dropout); the base model stays in eval mode."""

    def save_pretrained(self, directory, view: ModelView, **meta) -> None:
        from pipeline.methods.io import save_method

        save_method(self, directory, view, **meta)

    @classmethod
    def from_pretrained(cls, directory, view: ModelView, device="cpu") -> Trained:
        from pipeline.methods.io import load_method

        method = load_method(directory, view, device)
        if not isinstance(method, cls):
            raise MimicError(f"{directory} holds a {method.name} method, not {cls.name}")
        return method


def raise_mismatch(method: Trained, view: ModelView) -> None:
    """One line: the method's shapes do not fit this model."""
    raise MimicError(f"{method.name} was built for {method.layout()}; this model has {view.geometry}")
