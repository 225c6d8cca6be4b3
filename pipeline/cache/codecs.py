"""How one teacher sample becomes the arrays of the cache store and back (see `pipeline/cache/store.py`).

- ``lossless``: states keep the dtype the teacher computed in, bit for bit. Zarr has no bfloat16, so a
  bfloat16 tensor is stored as its uint16 bit pattern and the layout names the real dtype.
- ``int8``: each (layer, token) row of ``hidden`` values keeps its ``int8_outliers`` largest-magnitude
  values exactly (float32 value + int16 channel) and stores the rest as symmetric int8 with a float32
  scale ``absmax / 127``. Without the outliers, one massive-activation channel sets the scale and the
  relative L2 error reaches 10-15% (hidden 4096); with 8 of them it stays near 0.7% (benchmarks/cache_codecs.py).

Token-axis arrays are ``[num_layers, total_tokens, ...]`` (a sample is a contiguous slice of the token axis,
already in the ``[L, T, H]`` order the reader returns); answer-axis arrays are ``[total_answers, topk]``.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import MimicError

TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
# The numpy dtype each teacher dtype is stored as (bfloat16: its bit pattern).
STORED_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "uint16", "float64": "float64"}
CODECS = ("lossless", "int8")
CHUNK_TARGET_BYTES = 2 << 20  # uncompressed bytes of states per chunk (1-4 MiB measured best, docs/cache.md)
MAX_CHUNK_TOKENS = 512


@dataclass(frozen=True)
class Layout:
    """What a cache store holds and how it is chunked; stored in the store and compared on resume."""

    num_layers: int  # recorded layers L
    hidden_size: int  # H
    dtype: str = "float32"  # the teacher's dtype for states: float32 | float16 | bfloat16 | float64
    codec: str = "lossless"  # lossless (teacher dtype, Blosc zstd-3 bitshuffle) | int8 (<= 1% rel. L2 error)
    topk: int = 0  # teacher logits kept per answer token; 0 = no logits stored
    topk_dtype: str = "float32"  # dtype of the teacher's logits, stored losslessly
    int8_outliers: int = 8  # int8 only: values per (layer, token) kept exactly; ~ number of massive channels
    chunk_tokens: int = 0  # tokens per chunk (x all layers x hidden); 0 = auto, ~2 MiB uncompressed
    shard_chunks: int = (
        4  # chunks per shard file; a sample write rewrites the shard(s) it touches: keep it small
    )
    chunk_answers: int = 1024  # answer rows per chunk of the top-k arrays (small, unsharded)
    # per sample, at the query's last prompt token of every decoder layer: the layer output (task vectors) and
    # the attention heads' outputs, o_proj's input (function vectors); 0 = not stored
    last_layers: int = 0
    head_width: int = 0  # heads x head_dim: o_proj's input width

    def __post_init__(self) -> None:
        problems = []
        if self.num_layers < 1 or self.hidden_size < 1:
            problems.append("num_layers and hidden_size must be >= 1")
        for name in ("dtype", "topk_dtype"):
            if getattr(self, name) not in TORCH_DTYPES:
                problems.append(f"{name} must be one of {sorted(TORCH_DTYPES)}, not {getattr(self, name)!r}")
        if self.codec not in CODECS:
            problems.append(f"codec must be one of {list(CODECS)}, not {self.codec!r}")
        if self.last_layers < 0 or self.head_width < 0 or bool(self.last_layers) != bool(self.head_width):
            problems.append("last_layers and head_width are both 0 or both >= 1")
        if self.topk < 0 or self.chunk_tokens < 0 or self.shard_chunks < 1 or self.chunk_answers < 1:
            problems.append("topk, chunk_tokens >= 0 and shard_chunks, chunk_answers >= 1")
        if self.codec == "int8" and not 0 <= self.int8_outliers < self.hidden_size:
            problems.append("int8_outliers must be in [0, hidden_size)")
        if self.codec == "int8" and self.hidden_size >= 2**15:
            problems.append("codec int8 stores channel indices as int16: hidden_size must be < 32768")
        if problems:
            raise MimicError(f"cache layout {self}: " + "; ".join(problems))

    @property
    def token_chunk(self) -> int:
        """Tokens per chunk: chunk_tokens, or a power of two giving ~CHUNK_TARGET_BYTES of stored states."""
        if self.chunk_tokens:
            return self.chunk_tokens
        itemsize = 1 if self.codec == "int8" else np.dtype(STORED_DTYPES[self.dtype]).itemsize
        tokens = max(
            1, min(MAX_CHUNK_TOKENS, CHUNK_TARGET_BYTES // (self.num_layers * self.hidden_size * itemsize))
        )
        return 1 << (tokens.bit_length() - 1)

    @property
    def sample_chunk(self) -> int:
        """Samples per chunk of the last-token arrays: ~CHUNK_TARGET_BYTES of them."""
        itemsize = np.dtype(STORED_DTYPES[self.dtype]).itemsize
        width = self.last_layers * max(self.hidden_size, self.head_width) * itemsize
        return max(1, CHUNK_TARGET_BYTES // max(1, width))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Layout:
        return cls(**data)


@dataclass(frozen=True)
class ArraySpec:
    """One stored array: full shape ``(*lead, n, *tail)`` with ``n`` the ragged axis (tokens or answers)."""

    name: str
    dtype: str  # numpy dtype as stored
    lead: tuple[int, ...]
    tail: tuple[int, ...]
    axis: str  # "tokens" | "answers" | "samples" (one row per sample)

    def shape(self, n: int) -> tuple[int, ...]:
        return (*self.lead, n, *self.tail)

    def rows(self, start: int, stop: int) -> tuple[slice, ...]:
        """Index selecting rows [start, stop) of the ragged axis."""
        return (*(slice(None) for _ in self.lead), slice(start, stop))

    def take(self, array: np.ndarray, start: int, stop: int) -> np.ndarray:
        return array[self.rows(start, stop)]


def array_specs(layout: Layout) -> list[ArraySpec]:
    """The arrays a store of this layout holds, in checksum order."""
    lead, hidden = (layout.num_layers,), (layout.hidden_size,)
    if layout.codec == "lossless":
        specs = [ArraySpec("states", STORED_DTYPES[layout.dtype], lead, hidden, "tokens")]
    else:
        specs = [
            ArraySpec("states_q", "int8", lead, hidden, "tokens"),
            ArraySpec("states_scale", "float32", lead, (), "tokens"),
        ]
        if layout.int8_outliers:
            r = (layout.int8_outliers,)
            specs += [
                ArraySpec("outlier_index", "int16", lead, r, "tokens"),
                ArraySpec("outlier_value", "float32", lead, r, "tokens"),
            ]
    if layout.topk:
        k = (layout.topk,)
        specs += [
            ArraySpec("topk_values", STORED_DTYPES[layout.topk_dtype], (), k, "answers"),
            ArraySpec("topk_indices", "int64", (), k, "answers"),
        ]
    if layout.last_layers:
        dtype, n = STORED_DTYPES[layout.dtype], layout.last_layers
        specs += [
            ArraySpec("last_hidden", dtype, (), (n, layout.hidden_size), "samples"),
            ArraySpec("last_heads", dtype, (), (n, layout.head_width), "samples"),
        ]
    return specs


def _to_stored(x: torch.Tensor) -> np.ndarray:
    x = x.detach().to("cpu").contiguous()
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(np.uint16)
    return x.numpy()


def _from_stored(a: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def quantize_int8(x: torch.Tensor, outliers: int) -> dict[str, np.ndarray]:
    """Int8 rows with exact outliers. x: [L, T, H] -> q [L, T, H] int8, scale [L, T], index/value [L, T, r]."""
    x = x.detach().float()  # on the teacher's device; only the results go to the CPU
    magnitude = x.abs()  # (L, T, H)
    index = magnitude.topk(outliers, dim=-1).indices  # (L, T, r)
    value = x.gather(-1, index)  # (L, T, r)
    scale = magnitude.scatter_(-1, index, 0.0).amax(-1).div_(127)  # (L, T)
    scale.masked_fill_(scale == 0, 1.0)
    q = x.scatter(-1, index, 0.0).mul_(scale.reciprocal()[..., None]).round_().clamp_(-127, 127)  # (L, T, H)
    parts = {"states_q": q.to(torch.int8).cpu().numpy(), "states_scale": scale.cpu().numpy()}
    if outliers:
        parts.update(outlier_index=index.to(torch.int16).cpu().numpy(), outlier_value=value.cpu().numpy())
    return parts


def dequantize_int8(parts: dict[str, np.ndarray], dtype: str) -> torch.Tensor:
    """Inverse of quantize_int8 -> [L, T, H] in the teacher dtype."""
    q = torch.from_numpy(np.ascontiguousarray(parts["states_q"])).float()
    x = q * torch.from_numpy(np.ascontiguousarray(parts["states_scale"]))[..., None]  # (L, T, H)
    if "outlier_index" in parts:
        index = torch.from_numpy(np.ascontiguousarray(parts["outlier_index"])).long()
        x.scatter_(-1, index, torch.from_numpy(np.ascontiguousarray(parts["outlier_value"])))
    return x.to(TORCH_DTYPES[dtype])


def encode_sample(
    layout: Layout,
    states: torch.Tensor,
    topk_values: torch.Tensor | None,
    topk_indices: torch.Tensor | None,
    last_hidden: torch.Tensor | None = None,
    last_heads: torch.Tensor | None = None,
) -> dict[str, np.ndarray]:
    """Stored arrays of one (already validated) sample, keyed by ArraySpec.name."""
    parts = (
        {"states": _to_stored(states)}
        if layout.codec == "lossless"
        else quantize_int8(states, layout.int8_outliers)
    )
    if layout.topk:
        parts["topk_values"] = _to_stored(topk_values)
        parts["topk_indices"] = _to_stored(topk_indices)
    if layout.last_layers:  # one row each: [1, L, width]
        parts["last_hidden"] = _to_stored(last_hidden)[None]
        parts["last_heads"] = _to_stored(last_heads)[None]
    return parts


def decode_last(layout: Layout, parts: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """last_hidden [n, L, hidden] and last_heads [n, L, heads x head_dim] in layout.dtype."""
    return _from_stored(parts["last_hidden"], layout.dtype), _from_stored(parts["last_heads"], layout.dtype)


def decode_sample(
    layout: Layout, parts: dict[str, np.ndarray]
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """states [L, T, H] in layout.dtype, topk_values [A, K] or None, topk_indices [A, K] int64 or None."""
    if layout.codec == "lossless":
        states = _from_stored(parts["states"], layout.dtype)
    else:
        states = dequantize_int8(parts, layout.dtype)
    if not layout.topk:
        return states, None, None
    return (
        states,
        _from_stored(parts["topk_values"], layout.topk_dtype),
        _from_stored(parts["topk_indices"], "int64"),
    )


def checksum(layout: Layout, parts: dict[str, np.ndarray]) -> int:
    """CRC-32 of a sample's stored bytes, chained over its arrays in array_specs order."""
    crc = 0
    for spec in array_specs(layout):
        crc = zlib.crc32(np.ascontiguousarray(parts[spec.name]), crc)
    return crc
