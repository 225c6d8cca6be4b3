"""Task vectors and function vectors: one vector written into one decoder layer's output at the last prompt token,
fitted in one pass from the teacher cache (no gradient steps).

- `tv` (Hendel et al.): the layer-L output at the last prompt token of the k-shot prompts, averaged over the
  training samples; at generation it REPLACES layer L's output at the last prompt position.
- `fv` (Todd et al.): the attention heads' outputs (o_proj's input) at that token, averaged over the k-shot
  prompts; the heads whose mean output most raises the answer's probability in prompts with shuffled answers
  (causal mediation, seeded, `mediation_prompts` of them) are kept, their o_proj images summed and ADDED to one
  layer's output at the last prompt position.

Layer L (and fv's heads) are chosen on the validation queries (data.n_val, carved from the training pool):
the layer whose vector gives the lowest answer cross-entropy on zero-shot validation prompts.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import asdict, dataclass

import torch
from torch import nn

from pipeline.errors import MimicError
from pipeline.families import ModelView
from pipeline.methods.base import Handle, Trained
from pipeline.sites import _hidden
from pipeline.teacher import forward_inputs, last_prompt_positions
from pipeline.training import answer_ce

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VectorConfig:
    """Task vectors: which layers may carry the vector (the best on validation queries is kept)."""

    layers: list[int] | None  # candidate decoder layers; null = every layer

    def to_dict(self) -> dict:
        return asdict(self)

    kl_weight = align_weight = 0.0  # fitted from the cache: no logits or states are read per step


@dataclass(frozen=True)
class FunctionVectorConfig(VectorConfig):
    heads: int  # attention heads summed into the vector (the paper: 10)
    mediation_prompts: int  # shuffled-answer prompts the causal mediation averages over (its cost)
    seed: int  # picks those prompts and their shuffles

    def __post_init__(self):
        if self.heads < 1 or self.mediation_prompts < 1:
            raise MimicError(f"heads={self.heads}, mediation_prompts={self.mediation_prompts}: need >= 1")


@dataclass
class FitData:
    """What a fitted method reads: the model, the cache and the queries it may choose on."""

    model: nn.Module
    view: ModelView
    builder: object  # pipeline.prompts.PromptBuilder
    reader: object  # pipeline.cache.store.CacheReader with last-token signals
    support: list  # demonstration pool (fv's shuffled-answer prompts)
    validation: list  # data.n_val queries from the training pool
    k: int  # demonstrations per prompt, as the teacher's
    batch_size: int
    _batches: list | None = None

    def validation_batches(self) -> list[tuple[dict, torch.Tensor]]:
        """The zero-shot validation prompts with their answers, batched, and each row's last prompt position:
        built once for every candidate layer."""
        if self._batches is None:
            self._batches = []
            for first in range(0, len(self.validation), self.batch_size):
                queries = self.validation[first : first + self.batch_size]
                batch = self.builder.collate([self.builder.student(q) for q in queries])
                lengths = [len(self.builder.tokens(q).input_ids) for q in queries]
                self._batches.append((batch, last_prompt_positions(batch["answer_mask"], lengths)))
        return self._batches


class LastTokenVector(Trained):
    """One vector [hidden] at decoder layer `layer`'s output, last prompt token: replaced or added."""

    fitted = True
    Config = VectorConfig
    replace = True

    def __init__(self, config, hidden_size: int, layer: int = 0):
        super().__init__(config)
        self.vector = nn.Parameter(torch.zeros(hidden_size), requires_grad=False)
        self.layer = layer
        self.positions: torch.Tensor | None = None  # [B] for teacher-forced rows; None: generation's prefill
        self.report: dict = {}

    @classmethod
    def build(cls, name, config, view: ModelView, generator) -> LastTokenVector:
        return cls(config, view.geometry.hidden_size)

    @classmethod
    def rebuild(cls, name, config, layout: dict, view) -> LastTokenVector:
        method = cls(config, layout["hidden_size"], layout["layer"])
        method.report = layout.get("report", {})
        return method

    def layout(self) -> dict:
        return {"hidden_size": self.vector.shape[0], "layer": self.layer, "report": self.report}

    def num_parameters(self) -> int:
        return self.vector.numel()

    def attach(self, model: nn.Module) -> Handle:
        view = ModelView(model)
        if view.geometry.hidden_size != self.vector.shape[0] or self.layer >= view.geometry.num_layers:
            raise MimicError(f"{self.name} was fitted for {self.layout()}; this model has {view.geometry}")
        handle = view.layers[self.layer].register_forward_hook(self._hook)
        return Handle(self, [handle.remove])

    def _hook(self, _module, _args, output):
        h = _hidden(output)
        if self.positions is None:
            if h.shape[1] == 1:  # a decoding step: the prompt's last token was the prefill's
                return None
            positions = torch.full((h.shape[0],), h.shape[1] - 1)
        else:
            positions = self.positions
        rows, cols = torch.arange(h.shape[0], device=h.device), positions.to(h.device)
        vector = self.vector.to(h.device, h.dtype)
        h = h.clone()
        h[rows, cols] = vector if self.replace else h[rows, cols] + vector
        return (h, *output[1:]) if isinstance(output, tuple) else h

    def fit(self, data: FitData) -> dict:
        raise NotImplementedError


class TaskVector(LastTokenVector):
    name = "tv"

    def fit(self, data: FitData) -> dict:
        hidden, _ = mean_last_token(data.reader)  # (L, hidden)
        candidates = candidate_layers(self.config.layers, len(hidden))
        losses = {}
        for layer in candidates:
            self.layer = layer
            with torch.no_grad():
                self.vector.copy_(hidden[layer])
            losses[layer] = validation_ce(self, data)
        self.layer = min(losses, key=losses.get)
        with torch.no_grad():
            self.vector.copy_(hidden[self.layer])
        self.report = {"layer": self.layer, "validation_ce": {str(k): round(v, 5) for k, v in losses.items()}}
        return self.report


class FunctionVector(LastTokenVector):
    name = "fv"
    Config = FunctionVectorConfig
    replace = False

    def fit(self, data: FitData) -> dict:
        _, heads = mean_last_token(data.reader)  # (L, heads x head_dim)
        geo = data.view.geometry
        mean_heads = heads.view(geo.num_layers, geo.num_heads, geo.head_dim)
        effect = causal_mediation(data, mean_heads, self.config)  # (L, H)
        top = effect.flatten().topk(min(self.config.heads, effect.numel())).indices.tolist()
        chosen = [(i // geo.num_heads, i % geo.num_heads) for i in top]
        vector = torch.zeros(geo.hidden_size)
        with torch.no_grad():
            for (
                layer,
                head,
            ) in chosen:  # the head's mean output in its slot, through o_proj's weight (no bias)
                weight = data.view.output_projection(layer).weight.float().cpu()  # (hidden, H x D)
                d = geo.head_dim
                vector += weight[:, head * d : (head + 1) * d] @ mean_heads[layer, head].float()
        candidates = candidate_layers(self.config.layers, geo.num_layers)
        losses = {}
        with torch.no_grad():
            self.vector.copy_(vector)
        for layer in candidates:
            self.layer = layer
            losses[layer] = validation_ce(self, data)
        self.layer = min(losses, key=losses.get)
        self.report = {
            "layer": self.layer,
            "heads": [list(h) for h in chosen],
            "head_effects": [round(float(effect[layer, head]), 6) for layer, head in chosen],
            "validation_ce": {str(k): round(v, 5) for k, v in losses.items()},
        }
        return self.report


def candidate_layers(layers: list[int] | None, num_layers: int) -> list[int]:
    chosen = list(range(num_layers)) if layers is None else sorted(set(layers))
    if not chosen or not all(0 <= layer < num_layers for layer in chosen):
        raise MimicError(f"layers={layers}: the model has {num_layers} decoder layers")
    return chosen


def mean_last_token(reader, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache's last-token layer outputs [L, hidden] and head outputs [L, H x D], averaged over samples."""
    total_hidden = total_heads = None
    for start in range(0, len(reader), chunk):
        hidden, heads = reader.read_last(start, min(start + chunk, len(reader)))
        part_hidden, part_heads = hidden.double().sum(0), heads.double().sum(0)
        total_hidden = part_hidden if total_hidden is None else total_hidden + part_hidden
        total_heads = part_heads if total_heads is None else total_heads + part_heads
    return (total_hidden / len(reader)).float(), (total_heads / len(reader)).float()


def validation_ce(method: LastTokenVector, data: FitData) -> float:
    """Mean answer cross-entropy of the zero-shot validation prompts with the vector written in."""
    if not data.validation:
        raise MimicError(f"{method.name} chooses its layer on validation queries: set data.n_val > 0")
    device = next(data.model.parameters()).device
    total, count = 0.0, 0
    with method.attach(data.model), torch.no_grad():
        for batch, positions in data.validation_batches():
            method.positions = positions
            try:
                logits = data.model(**forward_inputs(data.view, batch, device), use_cache=False).logits
            finally:
                method.positions = None
            answers = int(batch["answer_mask"][:, 1:].sum())
            total += float(answer_ce(logits, batch, answers)) * answers
            count += answers
    return total / count


def shuffled_prompts(data: FitData, n: int, seed: int) -> list[tuple[list, object]]:
    """n (demonstrations with their answers shuffled among them, query) pairs: the corrupted prompts of causal
    mediation, where the demonstrations no longer show the task's mapping."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        query = data.validation[i % len(data.validation)]
        demos = rng.sample(data.support, data.k)
        answers = [d.answers for d in demos]
        rng.shuffle(answers)
        demos = [dataclasses.replace(d, id=f"{d.id}~shuffled{i}", answers=a) for d, a in zip(demos, answers)]
        pairs.append((demos, query))
    return pairs


def causal_mediation(data: FitData, mean_heads: torch.Tensor, config: FunctionVectorConfig) -> torch.Tensor:
    """[L, H] mean rise in the probability of the answer's first token when one head's output at the last
    prompt token of a shuffled-answer prompt is replaced by its mean over the teacher's k-shot prompts."""
    if not data.validation:
        raise MimicError("fv chooses its heads on validation queries: set data.n_val > 0")
    model, view, builder = data.model, data.view, data.builder
    geo = view.geometry
    device = next(model.parameters()).device
    effect = torch.zeros(geo.num_layers, geo.num_heads)
    d = geo.head_dim
    for demos, query in shuffled_prompts(data, config.mediation_prompts, config.seed):
        prompt = builder.generation(demos, query)
        target = int(builder.tokens(query).input_ids[builder.tokens(query).answer_mask][0])
        one = builder.collate([prompt])
        with torch.no_grad():
            last = model(**forward_inputs(view, one, device), logits_to_keep=1, use_cache=False).logits
            base = torch.softmax(last[0, -1].float(), -1)[target]
        # H copies of the prompt (a flat image list repeats in row order too)
        batch = {k: v.repeat(geo.num_heads, *([1] * (v.dim() - 1))) for k, v in one.items()}
        for layer in range(geo.num_layers):

            def patch(_module, args, layer=layer):
                x = args[0].clone()  # (H rows, T, H x D): row h gets head h's mean output
                for head in range(geo.num_heads):
                    x[head, -1, head * d : (head + 1) * d] = mean_heads[layer, head].to(x.device, x.dtype)
                return (x, *args[1:])

            handle = view.output_projection(layer).register_forward_pre_hook(patch)
            try:
                with torch.no_grad():
                    # the last position's logits only, no KV cache: H copies of a k-shot prompt
                    logits = model(**forward_inputs(view, batch, device), logits_to_keep=1, use_cache=False)
                    logits = logits.logits[:, -1].float()
            finally:
                handle.remove()
            effect[layer] += (torch.softmax(logits, -1)[:, target] - base).cpu()
    return effect / config.mediation_prompts
