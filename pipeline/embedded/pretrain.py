"""Pretrain the tiny LLaVA for in-context learning with a three-phase curriculum.

Phase 1 ("explicit") teaches the vision path: every round asks an explicit question ("What color is
it?") about a random task, so the answer depends on the image and the question only. Phase 2 ("icl")
teaches in-context learning: all rounds of a sequence belong to one task and (mostly) ask the ambiguous
question, so the attribute asked for can only be read off the earlier rounds' answers. Phase 3 ("noisy")
repeats phase 2 with unreliable demonstrations: each sequence has a noise rate drawn from [0, noise_max], and
each round answers another attribute of its image with that probability, so the asked attribute is the most
frequent one among the earlier answers (the noisy tasks' setting; noise rate 0 keeps the clean one). Every round's
answer (and its "\\n") is a label, so one sequence of R rounds trains 0 to R-1 shots at once.
Without gradient clipping the vision path did not learn in a prototype; without phase 1 the model
learned to recognise the task but guessed the attribute.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm
from transformers import LlavaForConditionalGeneration, ProcessorMixin

from pipeline.embedded.accuracy import ROUND_TEMPLATE
from pipeline.embedded.tasks import AMBIGUOUS_QUESTION, ATTRIBUTES, EXPLICIT_QUESTIONS, sample_scene

logger = logging.getLogger(__name__)

IGNORE = -100  # label of positions that carry no loss
ATTRIBUTE_TASKS = tuple(ATTRIBUTES)  # what pretraining asks; phase 3 makes their answers noisy


@dataclass(frozen=True)
class PretrainConfig:
    """Curriculum and optimiser settings; the defaults regenerate the committed weights."""

    explicit_steps: int = 400  # phase 1 steps: explicit questions, a random task per round
    icl_steps: int = 1700  # phase 2 steps: one task per sequence, ambiguous questions
    explicit_mix: float = 0.15  # phase 2: share of sequences that still ask explicit questions
    rounds: int = 7  # rounds per sequence: answers after 0..6 shots are all trained
    batch_size: int = 32  # sequences per step
    lr: float = 3e-3  # peak AdamW learning rate
    min_lr: float = 3e-4  # ~= lr/10, reached at the last step (cosine decay)
    warmup_steps: int = 100  # linear warmup from 0
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # max global gradient norm; needed for the vision path to learn
    noisy_steps: int = 1200  # phase 3 steps: phase 2 with noisy answers (its own warmup and cosine schedule)
    noise_max: float = 0.7  # phase 3: each sequence's noise rate is uniform in [0, noise_max]
    noisy_rounds: int = 13  # phase 3 rounds per sequence: answers after 0..12 shots
    noisy_lr: float = 1e-3  # phase 3 peak learning rate, decayed to min_lr
    pool_size: int = 16384  # scenes rendered once from the pretraining stream, then resampled
    log_every: int = 100  # steps between log lines

    @property
    def total_steps(self) -> int:
        """Steps of phases 1 and 2, the span of their learning-rate schedule."""
        return self.explicit_steps + self.icl_steps


@dataclass(frozen=True)
class ScenePool:
    """Rendered scenes: pixel values [N, 3, H, W] and, per task, the answer word of each scene."""

    pixel_values: torch.Tensor
    answers: dict[str, list[str]]


def render_pool(processor: ProcessorMixin, n: int, seed: int) -> ScenePool:
    """Render `n` random scenes from a stream of their own (not the support or query stream)."""
    rng = np.random.default_rng([seed, 7919])  # 7919: keeps this stream apart from tasks.split_rng
    scenes = [sample_scene(rng) for _ in tqdm(range(n), desc="render scenes", leave=False)]
    images: list[Image.Image] = [image for _, image in scenes]
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    answers = {task: [attributes[task] for attributes, _ in scenes] for task in ATTRIBUTE_TASKS}
    return ScenePool(pixel_values, answers)


def round_ids(processor: ProcessorMixin) -> dict[tuple[str, str], list[int]]:
    """Token ids of every (question, answer) round, tokenized by the processor as at evaluation."""
    blank = Image.new("RGB", (8, 8))
    questions = [AMBIGUOUS_QUESTION, *EXPLICIT_QUESTIONS.values()]
    table = {}
    for question in questions:
        for answer in (a for values in ATTRIBUTES.values() for a in values):
            text = ROUND_TEMPLATE.format(question=question, answer=answer)
            table[question, answer] = processor(text=text, images=blank)["input_ids"][0]
    return table


def sample_batch(
    pool: ScenePool,
    table: dict[tuple[str, str], list[int]],
    bos_id: int,
    pad_id: int,
    phase: str,
    config: PretrainConfig,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """One batch of right-padded few-shot sequences with labels on answer and "\\n" tokens.

    Returns input_ids, labels, attention_mask [B, T] and pixel_values [B * rounds, 3, H, W].
    """
    B, R = config.batch_size, (config.noisy_rounds if phase == "noisy" else config.rounds)
    scene = torch.randint(len(pool.pixel_values), (B, R), generator=generator)  # (B, R)
    task_of = torch.randint(len(ATTRIBUTE_TASKS), (B, R), generator=generator)  # (B, R)
    explicit = torch.rand(B, generator=generator) < config.explicit_mix
    if phase in ("icl", "noisy"):
        task_of = task_of[:, :1].expand(B, R)  # one task per sequence
    else:
        explicit = torch.ones(B, dtype=torch.bool)
    if phase == "noisy":  # a round answers another attribute (one of the other three) with the row's rate
        rate = config.noise_max * torch.rand(B, 1, generator=generator)  # (B, 1)
        swap = (torch.rand(B, R, generator=generator) < rate) & ~explicit[:, None]  # (B, R)
        shift = torch.randint(
            1, len(ATTRIBUTE_TASKS), (B, R), generator=generator
        )  # (B, R): another attribute
        task_of = torch.where(swap, (task_of + shift) % len(ATTRIBUTE_TASKS), task_of)
    sequences, targets = [], []
    for b in range(B):
        ids, labels = [bos_id], [IGNORE]
        for r in range(R):
            task = ATTRIBUTE_TASKS[task_of[b, r]]
            question = EXPLICIT_QUESTIONS[task] if explicit[b] else AMBIGUOUS_QUESTION
            tokens = table[question, pool.answers[task][scene[b, r]]]
            ids += tokens
            labels += [IGNORE] * (len(tokens) - 2) + tokens[-2:]  # answer and "\n"
        sequences.append(ids)
        targets.append(labels)
    length = max(len(s) for s in sequences)
    input_ids = torch.full((B, length), pad_id, dtype=torch.long)
    labels = torch.full((B, length), IGNORE, dtype=torch.long)
    for b, (ids, target) in enumerate(zip(sequences, targets)):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        labels[b, : len(target)] = torch.tensor(target)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": (input_ids != pad_id).long(),
        "pixel_values": pool.pixel_values[scene.flatten()],
    }


def learning_rate(step: int, config: PretrainConfig) -> float:
    """Phases 1-2 (step < total_steps): linear warmup to `lr`, then cosine decay to `min_lr`. Phase 3 has its
    own schedule of the same shape, peak `noisy_lr` over `noisy_steps`."""
    if step >= config.total_steps:
        return _warmup_cosine(step - config.total_steps, config.noisy_steps, config.noisy_lr, config)
    return _warmup_cosine(step, config.total_steps, config.lr, config)


def _warmup_cosine(step: int, steps: int, peak: float, config: PretrainConfig) -> float:
    """`warmup_steps` linear to `peak`, then cosine to `min_lr` at step `steps`."""
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, steps - config.warmup_steps)
    return config.min_lr + 0.5 * (peak - config.min_lr) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def answer_accuracy(logits: torch.Tensor, labels: torch.Tensor, eos_id: int) -> tuple[float, float]:
    """Training accuracy on answer tokens of the first round (0 shots) and of later rounds (1+ shots).

    logits [B, T, V], labels [B, T]; the first labelled answer of each row is its 0-shot answer.
    """
    targets = labels[:, 1:]  # (B, T-1)
    is_answer = (targets != IGNORE) & (targets != eos_id)
    correct = (logits[:, :-1].argmax(-1) == targets) & is_answer
    first = is_answer & (is_answer.cumsum(1) == 1)
    zero = (correct & first).sum() / first.sum()
    later = (correct & ~first).sum() / (is_answer & ~first).sum()
    return zero.item(), later.item()


def pretrain(
    model: LlavaForConditionalGeneration,
    processor: ProcessorMixin,
    config: PretrainConfig,
    seed: int,
    skip: tuple[str, ...] = (),
) -> LlavaForConditionalGeneration:
    """Run the curriculum phases on `model` in place (float32, CPU) and return it in eval mode.

    Phases in `skip` draw their batches (so later phases see the same random stream) but do not train:
    resuming from a model that already went through them gives the run that trains every phase.
    """
    generator = torch.Generator().manual_seed(seed)
    pool = render_pool(processor, config.pool_size, seed)
    table = round_ids(processor)
    tokenizer = processor.tokenizer
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98)
    )
    model.train()
    running = []
    schedule = (
        ["explicit"] * config.explicit_steps + ["icl"] * config.icl_steps + ["noisy"] * config.noisy_steps
    )
    progress = tqdm(range(len(schedule)), desc="pretrain")
    for step in progress:
        phase = schedule[step]
        batch = sample_batch(
            pool, table, tokenizer.bos_token_id, tokenizer.pad_token_id, phase, config, generator
        )
        if phase in skip:
            continue
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
        ).logits  # (B, T, V)
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        running.append((loss.item(), *answer_accuracy(logits, batch["labels"], tokenizer.eos_token_id)))
        if (step + 1) % config.log_every == 0:
            mean_loss, zero, later = (sum(values) / len(values) for values in zip(*running))
            running.clear()
            progress.set_postfix(
                phase=phase, loss=f"{mean_loss:.3f}", zero=f"{zero:.2f}", later=f"{later:.2f}"
            )
            logger.info(
                "step %d (%s): loss %.4f, answer accuracy %.3f at 0 shots, %.3f at 1+ shots",
                step + 1,
                phase,
                mean_loss,
                zero,
                later,
            )
    model.eval()
    return model
