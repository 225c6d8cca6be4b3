"""Training samples: (query, one of its M demonstration sets), numbered so that epoch e uses set e mod M."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipeline.data import Item
from pipeline.errors import MimicError
from pipeline.icd import sample_icd_sets
from pipeline.prompts import PromptBuilder, Segment


@dataclass(frozen=True)
class TrainingSamples:
    """Sample j = set s of query i with j = s * len(queries) + i."""

    queries: list[Item]
    support: list[Item]
    icd_sets: list[list[list[int]]]  # [query][set][k] indices into support

    @property
    def m(self) -> int:
        return len(self.icd_sets[0]) if self.icd_sets else 0

    def __len__(self) -> int:
        return self.m * len(self.queries)

    def demos(self, j: int) -> tuple[Item, list[Item]]:
        """The query of sample j and its demonstrations."""
        s, i = divmod(j, len(self.queries))
        return self.queries[i], [self.support[x] for x in self.icd_sets[i][s]]

    def epoch_samples(self, epoch: int) -> list[int]:
        """The sample numbers epoch `epoch` trains on: every query with ICD set (epoch mod M)."""
        start = (epoch % self.m) * len(self.queries)
        return list(range(start, start + len(self.queries)))


def training_samples(
    queries: list[Item], support: list[Item], k: int, m: int, seed: int, nearest=None
) -> TrainingSamples:
    """Each query with m ICD sets: seeded random draws, or `nearest(queries, support, k, m)` (RICES)."""
    if nearest is not None:
        return TrainingSamples(queries, support, nearest(queries, support, k, m))
    return TrainingSamples(queries, support, sample_icd_sets([q.id for q in queries], support, k, m, seed))


def teacher_samples(splits, ex, loaded, rices_encoder: str | None, device) -> TrainingSamples:
    """The teacher's (query, demonstrations) pairs as extract.icd picks them: extract and train use this."""
    nearest = None
    if ex.icd == "rices":
        from pipeline.rices import image_embedder, nearest_sets

        embed = image_embedder(loaded, rices_encoder, device)
        nearest = lambda q, s, k, m: nearest_sets(q, s, k, m, embed)  # noqa: E731
    return training_samples(splits.train, splits.support, ex.k, ex.m, ex.seed, nearest)


def collate_segments(segments: Sequence[Segment], builder: PromptBuilder) -> dict[str, torch.Tensor]:
    """A left-padded batch with the tokenizer's pad id."""
    return builder.collate(segments)


log = logging.getLogger(__name__)
POSITIONS = ("all", "text")


def kept_positions(
    builder: PromptBuilder, samples: TrainingSamples, indices: Sequence[int], positions: str, image_token_id
) -> list[torch.Tensor] | None:
    """Which query+answer positions of each sample are cached and aligned: None for all of them, else [n_i] bool
    masks, False at image tokens (`positions="text"`)."""
    if positions not in POSITIONS:
        raise MimicError(f"extract.positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
    if positions == "all":
        return None
    if image_token_id is None:  # Idefics v1: images enter through cross-attention, not as tokens
        _note_every_position_kept()
        return None
    return [builder.tokens(samples.demos(j)[0]).input_ids != image_token_id for j in indices]


@functools.cache
def _note_every_position_kept() -> None:
    log.info("extract.positions=text: this model has no image tokens in its text, every position is kept")


def batch_counts(
    builder: PromptBuilder, samples: TrainingSamples, indices: Sequence[int], positions: str, image_token_id
) -> tuple[int, int]:
    """A batch's answer tokens and aligned positions: the denominators of its losses, known to every process
    that holds a part of it."""
    rounds = [builder.tokens(samples.demos(j)[0]) for j in indices]
    kept = kept_positions(builder, samples, indices, positions, image_token_id)
    aligned = sum(len(r.input_ids) for r in rounds) if kept is None else sum(int(k.sum()) for k in kept)
    return sum(int(r.answer_mask.sum()) for r in rounds), aligned


def teacher_batch(builder: PromptBuilder, samples: TrainingSamples, indices: Sequence[int]):
    """Teacher inputs for samples `indices` and the number of query+answer tokens of each."""
    pairs = [samples.demos(j) for j in indices]
    batch = collate_segments([builder.teacher(demos, query) for query, demos in pairs], builder)
    return batch, [len(builder.tokens(query).input_ids) for query, _ in pairs]


def student_batch(builder: PromptBuilder, samples: TrainingSamples, indices: Sequence[int]):
    """Student inputs (query + answer only) for samples `indices` and their query+answer token counts."""
    queries = [samples.demos(j)[0] for j in indices]
    batch = collate_segments([builder.student(q) for q in queries], builder)
    return batch, [len(builder.tokens(q).input_ids) for q in queries]
