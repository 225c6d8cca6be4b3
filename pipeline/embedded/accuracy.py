"""Few-shot prompts in the project's fixed format, and accuracy by greedy argmax at the answer position.

A demonstration round is ROUND_TEMPLATE, the query round is QUERY_TEMPLATE; rounds are tokenized one by
one through the processor (text plus that round's image) and concatenated after the BOS token.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import LlavaForConditionalGeneration, ProcessorMixin

from pipeline.embedded.tasks import Item, make_items

ROUND_TEMPLATE = "<image>Question: {question} Short answer: {answer}\n"
QUERY_TEMPLATE = "<image>Question: {question} Short answer:"


def encode_round(
    processor: ProcessorMixin, item: Item, with_answer: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [T] and pixel values [1, 3, H, W] of one round (the first answer if `with_answer`)."""
    if with_answer:
        text = ROUND_TEMPLATE.format(question=item.question, answer=item.answers[0])
    else:
        text = QUERY_TEMPLATE.format(question=item.question)
    encoded = processor(text=text, images=item.image, return_tensors="pt")
    return encoded["input_ids"][0], encoded["pixel_values"]


def encode_few_shot(
    processor: ProcessorMixin, demos: Sequence[Item], query: Item
) -> tuple[torch.Tensor, torch.Tensor]:
    """`[bos] + demo rounds + query round`: token ids [T] and pixel values [len(demos) + 1, 3, H, W]."""
    rounds = [encode_round(processor, demo, with_answer=True) for demo in demos]
    rounds.append(encode_round(processor, query, with_answer=False))
    bos = torch.tensor([processor.tokenizer.bos_token_id])
    ids = torch.cat([bos, *(r[0] for r in rounds)])
    return ids, torch.cat([r[1] for r in rounds])


def answer_token_id(processor: ProcessorMixin, answer: str) -> int:
    """The id of a one-token answer (every answer of the suite is one token)."""
    ids = processor.tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"answer {answer!r} is {len(ids)} tokens, expected 1")
    return ids[0]


def sample_demos(support: Sequence[Item], k: int, n: int, seed: int) -> list[list[Item]]:
    """For each of `n` queries, `k` distinct demonstrations drawn from `support` (seeded)."""
    rng = np.random.default_rng(seed)
    return [[support[i] for i in rng.choice(len(support), size=k, replace=False)] for _ in range(n)]


@torch.no_grad()
def predict_next_token(
    model: LlavaForConditionalGeneration, prompts: Sequence[tuple[torch.Tensor, torch.Tensor]], pad_id: int
) -> torch.Tensor:
    """Greedy next-token ids [N] after each prompt; prompts are right-padded into one batch."""
    lengths = torch.tensor([len(ids) for ids, _ in prompts])
    input_ids = torch.full((len(prompts), int(lengths.max())), pad_id, dtype=torch.long)  # (N, T)
    for row, (ids, _) in enumerate(prompts):
        input_ids[row, : len(ids)] = ids
    attention_mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()
    pixel_values = torch.cat([pixels for _, pixels in prompts]).to(model.dtype)  # (images, 3, H, W)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values).logits
    return logits[torch.arange(len(prompts)), lengths - 1].argmax(-1)  # (N,)


def few_shot_accuracy(
    model: LlavaForConditionalGeneration,
    processor: ProcessorMixin,
    task: str,
    k: int,
    n_queries: int,
    seed: int,
    n_support: int = 256,
    batch_size: int = 50,
) -> float:
    """Share of held-out queries of `task` answered right with `k` random support demonstrations."""
    queries = make_items(task, "query", n_queries, seed)
    support = make_items(task, "support", n_support, seed)
    demos = sample_demos(support, k, n_queries, seed)
    model.eval()
    correct = 0
    for start in range(0, n_queries, batch_size):
        batch = range(start, min(start + batch_size, n_queries))
        prompts = [encode_few_shot(processor, demos[i], queries[i]) for i in batch]
        predicted = predict_next_token(model, prompts, processor.tokenizer.pad_token_id)
        expected = torch.tensor([answer_token_id(processor, queries[i].answers[0]) for i in batch])
        correct += int((predicted == expected).sum())
    return correct / n_queries
