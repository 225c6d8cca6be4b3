"""The objectives (CE, layer-wise MSE, top-k KL), target sources (cache or online teacher) and resumable training
state."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.config import ExtractConfig
from pipeline.errors import MimicError, one_line
from pipeline.families import ModelView
from pipeline.prompts import PromptBuilder
from pipeline.samples import TrainingSamples, kept_positions, student_batch, teacher_batch
from pipeline.teacher import forward_inputs, forward_query_states


def alignment_loss(
    student: Sequence[torch.Tensor], target: Sequence[torch.Tensor], tokens: int | None = None
) -> torch.Tensor:
    """Mean over layers of the MSE between student and teacher states; each item [L, n_i, hidden]. With
    `tokens` (the whole batch's, when this process holds a part of it) the squared errors are divided by the
    batch's count, so the parts' losses add up to the batch's."""
    s = torch.cat(list(student), 1)  # (L, sum n_i, hidden)
    t = torch.cat([x.to(s.dtype) for x in target], 1)
    count = s.shape[1] if tokens is None else tokens
    return (s - t).square().sum() / (s.shape[0] * count * s.shape[2])


def answer_ce(
    logits: torch.Tensor, batch: dict[str, torch.Tensor], answers: int | None = None
) -> torch.Tensor:
    """Cross-entropy of the answer tokens; the logit at position t predicts token t + 1. With `answers` (the
    whole batch's answer tokens) the sum is divided by that count, as `alignment_loss` does with `tokens`."""
    mask = batch["answer_mask"][:, 1:].to(logits.device)
    labels = batch["input_ids"][:, 1:].to(logits.device)
    total = F.cross_entropy(logits[:, :-1][mask].float(), labels[mask], reduction="sum")
    return total / (int(mask.sum()) if answers is None else answers)


def topk_kl(student_logits: torch.Tensor, teacher_logp: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Sum over answer tokens of KL(teacher || student), the teacher known by its top-k log-probabilities.

    student_logits [A, V]; teacher_logp, indices [A, K] (log_softmax over the whole vocabulary, then top-k).
    The other V - K tokens are one bucket with the teacher's remaining mass, so the KL is exact for the
    teacher's distribution coarsened to K + 1 outcomes, and equals the full-vocabulary KL when K = V.
    """
    student = torch.log_softmax(student_logits.float(), -1)  # (A, V)
    p_top = teacher_logp.float().exp()  # (A, K)
    q_top = student.gather(-1, indices)  # (A, K)
    head = (p_top * (teacher_logp.float() - q_top)).sum(-1)  # (A,)
    if indices.shape[-1] == student.shape[-1]:  # nothing outside the top-k (1 - sum(p) is only rounding)
        return head.sum()
    p_tail = (1 - p_top.sum(-1)).clamp_min(0)  # (A,)
    # log of the student's mass outside the top-k, without cancellation: logsumexp over the other tokens
    outside = student.scatter(-1, indices, float("-inf"))
    q_tail = torch.logsumexp(outside, -1)  # (A,)
    tail = torch.where(
        p_tail > 0, p_tail * (torch.log(p_tail.clamp_min(1e-30)) - q_tail), torch.zeros_like(p_tail)
    )
    return (head + tail).sum()


def answer_logits(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits predicting the answer tokens, rows in batch order then position order: [A, V]."""
    mask = batch["answer_mask"][:, 1:].to(logits.device)
    return logits[:, :-1][mask]


@dataclass(frozen=True)
class Weights:
    ce: float
    align: float
    kl: float


def batch_loss(
    model,
    view: ModelView,
    inputs: tuple,
    target,
    counts,
    ex: ExtractConfig,
    layers: Sequence[int],
    weights: Weights,
) -> list[torch.Tensor]:
    """[loss, ce, align, kl] of this process's part of a batch, each divided by the WHOLE batch's counts
    (answers, aligned positions) so that the parts add up. `inputs`: the part's `student_inputs`; `target`: the
    cache's (states, top-k log-probs, top-k ids) per sample of the part. States are recorded only when aligned,
    logits kept only where needed."""
    answers, aligned = counts
    batch, lengths, keep = inputs
    zero = torch.zeros((), device=next(model.parameters()).device)
    if weights.align > 0:
        got, logits = forward_query_states(model, view, batch, lengths, ex.site, layers, kept=keep)
        align = alignment_loss(got.states, [t[0].to(logits.device) for t in target], aligned)
    else:
        logits = model(**forward_inputs(view, batch, zero.device), use_cache=False).logits  # (B, T, V)
        align = zero
    ce = answer_ce(logits, batch, answers)
    kl = zero
    if weights.kl > 0:
        values = torch.cat([t[1] for t in target]).to(logits.device)  # (A, K)
        indices = torch.cat([t[2] for t in target]).to(logits.device)
        kl = topk_kl(answer_logits(logits, batch), values, indices) / answers
    loss = weights.ce * ce + weights.align * align + weights.kl * kl
    return [loss, ce, align, kl]


def student_inputs(
    builder: PromptBuilder, samples: TrainingSamples, part, ex: ExtractConfig, view: ModelView
):
    """The student batch of samples `part`, its query+answer lengths and its aligned positions (`kept_positions`)."""
    batch, lengths = student_batch(builder, samples, part)
    return batch, lengths, kept_positions(builder, samples, part, ex.positions, view.image_token_id)


class CacheTargets:
    """Cached teacher states for a list of sample batches, read one batch ahead in a background thread."""

    def __init__(self, reader, batches: Sequence[Sequence[int]]):
        self.reader, self.batches = reader, list(batches)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-prefetch")

    def __iter__(self):
        with self.pool:
            pending = self.pool.submit(self._read, 0) if self.batches else None
            for i in range(len(self.batches)):
                current = pending.result()
                pending = self.pool.submit(self._read, i + 1) if i + 1 < len(self.batches) else None
                yield current

    def _read(self, i: int) -> list[tuple]:
        return self.reader.read_many(self.batches[i]) if self.batches[i] else []


class OnlineTargets:
    """The reference mode, as the paper's code trains: the frozen teacher runs on the same ICD sets every step."""

    def __init__(
        self,
        model,
        view: ModelView,
        builder: PromptBuilder,
        samples: TrainingSamples,
        shift,
        batches: Sequence[Sequence[int]],
        extract: ExtractConfig,
        layers: Sequence[int],
    ):
        self.args = model, view, builder, samples, shift, extract, layers
        self.batches = list(batches)

    def __iter__(self):
        model, view, builder, samples, shift, ex, layers = self.args
        for indices in self.batches:
            if not indices:  # this process's part of a batch is empty
                yield []
                continue
            batch, lengths = teacher_batch(builder, samples, indices)
            keep = kept_positions(builder, samples, indices, ex.positions, view.image_token_id)
            with torch.no_grad(), _disabled(shift):
                got, _ = forward_query_states(
                    model, view, batch, lengths, ex.site, layers, all_logits=False, kept=keep
                )
            yield [(states, None, None) for states in got.states]


@contextlib.contextmanager
def _disabled(shift):
    was, shift.enabled = shift.enabled, False
    try:
        yield
    finally:
        shift.enabled = was


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: a crash leaves the previous checkpoint, never half of a new one."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise MimicError(
            f"checkpoint {path} is unreadable ({type(err).__name__}: {one_line(err)[:200]}); delete it or pass "
            "--replace to restart the run"
        ) from err


def epoch_batches(samples: TrainingSamples, epoch: int, batch_size: int, seed: int) -> list[list[int]]:
    """This epoch's sample numbers, shuffled by (seed, epoch), cut into batches."""
    ids = samples.epoch_samples(epoch)
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    shuffled = [ids[i] for i in order]
    return [shuffled[i : i + batch_size] for i in range(0, len(shuffled), batch_size)]


def autocast_for(device: str, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16/fp16 autocast on GPU; fp32 (no autocast) otherwise."""
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if precision == "fp32":
        return contextlib.nullcontext
    if precision not in dtypes:
        raise MimicError(f"train.precision must be fp32, bf16 or fp16, got {precision!r}")
    if not (device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())):
        raise MimicError(
            f"train.precision={precision} needs a GPU (model.device is {device}); use fp32 on CPU"
        )
    return lambda: torch.autocast("cuda", dtype=dtypes[precision])
