"""Typed, frozen configs for every stage, parsed from `params.yaml` sections with strict key checking.

Each section is a dataclass; unknown or missing keys raise ONE MimicError listing all of them. Overrides come
as "field=value" strings (the CLI's `--set`), parsed as YAML scalars and checked the same way.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from pipeline.errors import MimicError

# The choices of the text-valued fields (tests/test_config.py checks them against the modules that use them).
SITES = ("attn", "mlp", "layer")  # pipeline.families.SITES
CODECS = ("lossless", "int8")  # pipeline.cache.codecs.CODECS
PRECISIONS = ("fp32", "bf16", "fp16")
PROMPT_METHODS = ("zero_shot", "icl", "rices")  # pipeline.methods.PROMPT_METHODS
DTYPES = ("float32", "float16", "bfloat16", "float64")  # pipeline.models.DTYPES


def _one_of(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise MimicError(f"{field}={value!r}: choose one of {', '.join(choices)}")


def _at_least(section: str, minimum: int | float, **values) -> None:
    """One error naming every field of `section` below its minimum."""
    low = [f"{section}.{k}={v!r}" for k, v in values.items() if v is not None and v < minimum]
    if low:
        raise MimicError(f"{', '.join(low)}: must be at least {minimum}")


@dataclass(frozen=True)
class ModelConfig:
    name: str  # "embedded" or a local checkpoint directory
    dtype: str  # float32 on CPU; bfloat16 on GPU for 8B models
    device: str  # "cpu", "cuda", "cuda:1" ..., or "auto": one model over this machine's GPUs (accelerate)

    def __post_init__(self):
        _one_of("model.dtype", self.dtype, DTYPES)


@dataclass(frozen=True)
class DataConfig:
    train: dict  # a pipeline.data.DataSource: the pool for demonstrations and training queries
    eval: dict  # a pipeline.data.DataSource: held-out evaluation queries
    n_support: int  # demonstration pool size, drawn from `train`
    n_train: int  # training queries, drawn from `train`, disjoint from the support set (the paper: 1,000)
    n_eval: int  # evaluation queries, drawn from `eval`
    n_val: int  # validation queries from `train`, disjoint from the rest: choices of layer or heads (tv, fv)
    seed: int  # picks the support, training and evaluation items
    rices_encoder: (
        str | None
    )  # RICES image embeddings: a local vision encoder directory; null = the model's own
    workers: int  # threads building prompts (image preprocessing) ahead of the model; 0 = batch by batch

    def __post_init__(self):
        _at_least("data", 1, n_support=self.n_support, n_train=self.n_train, n_eval=self.n_eval)
        _at_least("data", 0, n_val=self.n_val, workers=self.workers)


@dataclass(frozen=True)
class ExtractConfig:
    k: int  # demonstrations per teacher prompt
    m: int  # ICD sets per training query (epoch e uses set e mod m)
    site: str  # recorded site: mlp (the reference), attn or layer
    layers: list[int] | None  # recorded layers; null = all
    codec: str  # lossless (teacher dtype, Blosc zstd + bitshuffle) or int8 (per-token scale)
    topk: int  # teacher log-probabilities kept per answer token (0 = none): LIVE's KL
    last_token: bool  # also cache each layer's and head's output at the last prompt token: tv, fv
    positions: str  # all | text: text keeps only the query's text and answer tokens (no image tokens)
    chunk_tokens: int  # tokens per store chunk (x layers x hidden); 0 = auto, ~2 MiB; a shard holds 4 chunks
    batch_size: int  # teacher prompts per forward
    seed: int  # ICD sampling seed
    icd: str  # the teacher's demonstrations: random | rices (the most similar support images)

    def __post_init__(self):
        _at_least("extract", 1, k=self.k, m=self.m, batch_size=self.batch_size)
        _one_of("extract.icd", self.icd, ("random", "rices"))
        _at_least("extract", 0, topk=self.topk, chunk_tokens=self.chunk_tokens)
        if self.layers is not None and (not self.layers or min(self.layers) < 0):
            raise MimicError(f"extract.layers={self.layers!r}: give layer numbers from 0, or null for all")
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise MimicError(f"extract.layers={self.layers!r}: name each layer once")
        _one_of("extract.site", self.site, SITES)
        _one_of("extract.codec", self.codec, CODECS)
        if self.positions not in ("all", "text"):
            raise MimicError(f"extract.positions must be all or text, got {self.positions!r}")


@dataclass(frozen=True)
class TrainConfig:
    """The training loop every trained method shares; each method's objective and optimizer are in `methods`."""

    method: str  # the method `mimic train` fits (dvc.yaml sets it per run): a name of params.yaml `methods`
    epochs: int
    warmup: float  # fraction of steps with linear warmup, then cosine decay
    batch_size: int
    grad_accum: int  # optimizer step every grad_accum batches
    clip: float  # gradient norm clipping
    precision: str  # fp32 | bf16 | fp16 (autocast; GPU only)
    seed: int  # initialisation and batch order

    def __post_init__(self):
        _at_least("train", 1, epochs=self.epochs, batch_size=self.batch_size, grad_accum=self.grad_accum)
        _at_least("train", 0, warmup=self.warmup)
        _one_of("train.precision", self.precision, PRECISIONS)
        if not (0 < self.clip < math.inf and self.warmup < 1):
            raise MimicError(
                f"train.clip={self.clip}, train.warmup={self.warmup}: clip must be positive, warmup a fraction below 1"
            )


@dataclass(frozen=True)
class EvaluateConfig:
    methods: list[str]  # prompt methods: any of zero_shot, icl, rices (trained runs come from `runs`)
    k: int  # demonstrations for the icl method
    batch_size: int
    max_batch_tokens: int  # padded prompt tokens x rows x beams per generate call (its KV cache); 0 = no cap
    num_beams: int  # 1 = greedy; the paper uses 3 for VQA
    max_new_tokens: int  # the paper uses 10 for VQA
    repeats: int  # timed passes over the queries (latency spread); answers come from the first
    seed: int  # demonstration sampling for icl

    def __post_init__(self):
        _at_least("evaluate", 1, k=self.k, batch_size=self.batch_size, num_beams=self.num_beams)
        _at_least("evaluate", 1, max_new_tokens=self.max_new_tokens, repeats=self.repeats)
        _at_least("evaluate", 0, max_batch_tokens=self.max_batch_tokens)


@dataclass(frozen=True)
class Params:
    model: ModelConfig
    data: DataConfig
    prompt: str  # one round: {image}, {question}, {answer}
    extract: ExtractConfig
    train: TrainConfig
    methods: dict  # method name -> its section (lr, loss weights, method-specific fields): pipeline.methods
    trained: list[str]  # the methods `dvc repro` trains (one train stage each, runs/<name>) and evaluates
    seeds: list[int]  # `dvc repro` runs the pipeline once per seed (extract, train and evaluate seeds)
    evaluate: EvaluateConfig

    def __post_init__(self):
        # each section is parsed by its method's config class where it is used (pipeline.methods.method_configs):
        # the registry imports the methods' code, which the extract stage must not depend on
        missing = [m for m in [self.train.method, *self.trained] if m not in self.methods]
        if missing:
            raise MimicError(f"train.method / trained name {missing}: add a section for each under `methods`")
        unknown = [m for m in self.evaluate.methods if m not in PROMPT_METHODS]
        if unknown:
            raise MimicError(
                f"evaluate.methods: unknown {unknown}; choose from {', '.join(PROMPT_METHODS)} (trained methods "
                "are evaluated from their run directories)"
            )
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise MimicError(f"seeds: {self.seeds}; list at least one seed, each once")
        for field, k in (("extract.k", self.extract.k), ("evaluate.k", self.evaluate.k)):
            if k > self.data.n_support:
                raise MimicError(f"{field}={k} demonstrations, but data.n_support={self.data.n_support}")
        if self.train.precision != "fp32" and not self.model.device.startswith(("cuda", "auto")):
            raise MimicError(
                f"train.precision={self.train.precision} needs a GPU (model.device is {self.model.device}); "
                "use fp32 on CPU"
            )


def _check(value, kind, where: str):
    """Coerce YAML values to the annotated type (int -> float allowed) or raise naming the field."""
    origin = typing.get_origin(kind)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            number = float(value)
        except ValueError:
            raise MimicError(f"{where} must be a number, got {value!r}") from None
        if math.isfinite(number):
            return number
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(kind)
        if value is None and type(None) in args:
            return None
        return _check(value, next(a for a in args if a is not type(None)), where)
    if origin is list:
        if not isinstance(value, list):
            raise MimicError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(kind)
        return [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(kind):
        return parse_section(kind, value, where)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MimicError(f"{where} must be {kind.__name__}, got {value!r}")
    return value


def parse_section(cls, data: dict, where: str):
    """Build `cls` from a mapping; every unknown and missing key is named in one error."""
    if not isinstance(data, dict):
        raise MimicError(f"{where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(names))
    missing = [n for n in names if n not in data]
    if unknown or missing:
        parts = [f"unknown keys {unknown}" if unknown else "", f"missing keys {missing}" if missing else ""]
        raise MimicError(f"{where}: " + "; ".join(p for p in parts if p))
    return cls(**{n: _check(data[n], hints[n], f"{where}.{n}") for n in names})


def apply_overrides(data: dict, overrides: list[str], where: str) -> dict:
    """`["methods.mimic.lr=0.01", "extract.k=8"]` applied to the raw mapping (dotted paths, YAML-parsed values;
    a field holding text takes the text as written where YAML fails or reads a mapping or list, e.g.
    `prompt={question}`,
    and a YAML double-quoted value gives escapes such as `\\n`)."""
    data = yaml.safe_load(yaml.safe_dump(data))  # deep copy
    for item in overrides:
        if "=" not in item:
            raise MimicError(f"override {item!r} is not of the form section.field=value")
        path, raw = item.split("=", 1)
        keys = path.split(".")
        node = data
        for key in keys[:-1]:
            if not isinstance(node.get(key), dict):
                raise MimicError(f"override {item!r}: {where} has no section {key!r}")
            node = node[key]
        if (
            keys[-1] not in node and len(keys) < 3
        ):  # deeper keys are inside a free-form mapping (data.train.*)
            raise MimicError(f"override {item!r}: {where} has no field {path!r}")
        text_field = isinstance(node.get(keys[-1]), str)  # e.g. the prompt: its braces are not YAML mappings
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            if not text_field:
                problem = " ".join(str(getattr(err, "problem", "") or err).split())
                raise MimicError(f"override {item!r}: the value is not valid YAML ({problem})") from err
            value = raw
        # YAML's braces and brackets are text in a text field; null, numbers and booleans keep their meaning
        node[keys[-1]] = raw if text_field and isinstance(value, (dict, list)) else value
    return data


def load_params(path: str | Path, overrides: list[str] = ()) -> Params:
    """Read, override and validate the whole params file."""
    path = Path(path)
    if not path.is_file():
        raise MimicError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise MimicError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from err
    if raw is not None and not isinstance(raw, dict):
        raise MimicError(
            f"{path} must hold a mapping of sections (model:, data:, ...), not a {type(raw).__name__}"
        )
    return parse_section(Params, apply_overrides(raw or {}, list(overrides), str(path)), str(path))
