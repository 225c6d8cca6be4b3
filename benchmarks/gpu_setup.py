"""What benchmarks/gpu.py runs on: its sizes (the full run and the CPU dry run), timing helpers with CUDA
synchronisation, and the decoder of 8B text geometry that sections c-e time."""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers as tf

import pipeline.attention as attention
import pipeline.methods.routing as routing
from pipeline.families import ModelView
from pipeline.methods.mimic import MimicShift, spec_for
from pipeline.models import Loaded, load_processor

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = "abcde"
OUTSIDE_CHECK = ROOT.parent / "shared" / "tools" / "gpu_lse_check.py"
ERRORS = ("out", "lse", "dq", "dk", "dv")  # section a's compared tensors
EIGHT_B = dict(  # Mistral-7B / Idefics2-8b text geometry
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=32000,
    max_position_embeddings=8192,
)
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=64,
    max_position_embeddings=1024,
)


@dataclass(frozen=True)
class Sizes:
    exact: tuple[int, int, int, int, int]  # section a: batch, heads, KV heads, tokens, head_dim
    heads: dict  # section b: text config of the one-layer decoder whose attention module is timed
    lengths: tuple[int, ...]  # section b: tokens
    repeats: int  # timed runs per figure; the median is reported
    decoder: dict  # sections c-e: text config
    prompt: int  # section c: prompt tokens
    new_tokens: int  # section c: generated tokens
    queries: int  # sections d, e: training queries
    support: int  # sections d, e: demonstration pool
    shots: int  # sections d, e: demonstrations per teacher prompt
    batch: int  # sections d, e: teacher prompts per forward / training batch
    rounds: int  # sections c-e: timed rounds (median / best reported)
    targets: dict = field(
        default_factory=lambda: {"heads_fwd": 1.1, "heads_fwd_bwd": 1.5, "decode": 1.05, "extract": 1.1}
    )


FULL = Sizes(
    exact=(2, 8, 2, 300, 128),
    heads={**EIGHT_B, "num_hidden_layers": 1},
    lengths=(256, 1024, 4096),
    repeats=10,
    decoder=EIGHT_B,
    prompt=512,
    new_tokens=64,
    queries=128,
    support=64,
    shots=8,
    batch=16,
    rounds=3,
)
DRY = Sizes(
    exact=(2, 4, 2, 40, 16),
    heads={**TINY, "num_hidden_layers": 1},
    lengths=(16, 32),
    repeats=2,
    decoder=TINY,
    prompt=16,
    new_tokens=4,
    queries=8,
    support=16,
    shots=2,
    batch=4,
    rounds=1,
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_of(step, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    return time.perf_counter() - start


def median_seconds(step, device: torch.device, repeats: int) -> float:
    for _ in range(2):  # warm-up: allocations, kernel selection, the self-check on first use
        step()
    return statistics.median(seconds_of(step, device) for _ in range(repeats))


def peak_mib(step, device: torch.device) -> float | None:
    """GPU memory one step allocates above what was allocated before it (None on the CPU: not measured)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


@contextlib.contextmanager
def materialized_heads(on: bool):
    """Routed attention through the materialized path (the fallback) instead of the fused kernel."""
    original = routing.attention_with_lse
    if on:
        routing.attention_with_lse = lambda *a, **k: attention.attention_with_lse(*a, **{**k, "fused": False})
    try:
        yield
    finally:
        routing.attention_with_lse = original


def build_decoder(text: dict, dtype: torch.dtype, device: torch.device) -> Loaded:
    """The embedded LLaVA (processor, CLIP tower, projector) around a random-init Mistral decoder of `text`
    geometry, built on `device`: no checkpoint is read or written."""
    from pipeline.embedded import MODEL_DIR

    config = tf.AutoConfig.from_pretrained(MODEL_DIR, local_files_only=True)
    ids = {k: getattr(config.text_config, k) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    config.text_config = tf.MistralConfig(**text, **ids)
    torch.manual_seed(0)
    with torch.device(device):
        model = tf.LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    return Loaded(
        model, load_processor(MODEL_DIR, "llava"), ModelView(model), "embedded, random-init decoder"
    )


def new_shift(loaded: Loaded) -> MimicShift:
    shift = MimicShift(spec_for(loaded.view), torch.Generator().manual_seed(0))
    return shift.to(next(loaded.model.parameters()).device)
