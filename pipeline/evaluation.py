"""Batched generation (left padding) and scoring with the metric each data kind is scored by."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from pipeline.data import Item
from pipeline.errors import MimicError
from pipeline.prompts import PromptBuilder, Segment
from pipeline.teacher import model_inputs


@dataclass
class Generated:
    answers: list[str]
    seconds: float  # wall time of all generate calls
    prompt_tokens: list[int]  # non-padding prompt length of each sample


class GenerationPrompts(Sequence):
    """Generation prompts built when a batch needs them (each k-shot prompt carries k + 1 images' tensors, so
    holding all of them at once grows with the number of queries): prompt n is demos[n] + queries[n]."""

    def __init__(self, builder: PromptBuilder, demos: Sequence[Sequence[Item]], queries: Sequence[Item]):
        self.builder, self.demos, self.queries = builder, demos, queries

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, n):
        if isinstance(n, slice):
            return [self[i] for i in range(*n.indices(len(self)))]
        return self.builder.generation(self.demos[n], self.queries[n])


def generation_batches(
    prompts: Sequence[Segment], batch_size: int, max_tokens: int, beams: int
) -> Iterator[list[Segment]]:
    """Consecutive prompts in batches of at most `batch_size`, and (when `max_tokens` > 0) at most `max_tokens`
    padded prompt tokens x beams, the size of the KV cache a batch fills; a longer prompt goes alone."""
    batch: list[Segment] = []
    longest = 0  # the longest prompt in `batch`: every row is padded to it
    for n in range(len(prompts)):
        prompt = prompts[n]
        wider = max(longest, len(prompt.input_ids))
        full = len(batch) == batch_size or 0 < max_tokens < wider * (len(batch) + 1) * beams
        if batch and full:
            yield batch
            batch, wider = [], len(prompt.input_ids)
        batch.append(prompt)
        longest = wider
    if batch:
        yield batch


def generate_answers(
    model,
    builder: PromptBuilder,
    prompts: Sequence[Segment],
    batch_size: int,
    num_beams: int,
    max_new_tokens: int,
    desc: str = "generate",
    max_batch_tokens: int = 0,
    progress: bool = True,
) -> Generated:
    """Greedy (or beam) decoding of each prompt, in order; the answer is the text before the first newline.
    `prompts` may build each prompt on access (GenerationPrompts): only the batch in flight is held."""
    tokenizer = builder.processor.tokenizer
    stop = NewlineStop(newline_tokens(tokenizer))
    device = next(model.parameters()).device
    answers: list[str] = []
    lengths: list[int] = []
    seconds = 0.0
    with tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress) as bar:
        for segments in generation_batches(prompts, batch_size, max_batch_tokens, num_beams):
            batch = builder.collate(segments)
            start = time.perf_counter()
            with torch.no_grad():
                out = model.generate(
                    **model_inputs(batch, device),
                    max_new_tokens=max_new_tokens,
                    num_beams=num_beams,
                    do_sample=False,
                    eos_token_id=tokenizer.eos_token_id,
                    stopping_criteria=StoppingCriteriaList([stop]),
                    pad_token_id=tokenizer.pad_token_id,
                    # beams rank by summed log-probability (no length normalisation); greedy takes no such flag
                    **({"length_penalty": 0.0} if num_beams > 1 else {}),
                )
            seconds += time.perf_counter() - start
            new = out[:, batch["input_ids"].shape[1] :]
            for text in tokenizer.batch_decode(new, skip_special_tokens=True):
                answers.append(text.split("\n")[0].strip())
            lengths += [len(s.input_ids) for s in segments]
            bar.update(len(segments))
    return Generated(answers, seconds, lengths)


@functools.cache
def _newline_tokens(tokenizer) -> tuple[int, ...]:
    ids = list(range(len(tokenizer)))
    texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=True)
    return tuple(i for i, text in zip(ids, texts) if "\n" in text)


def newline_tokens(tokenizer) -> list[int]:
    """Every token id whose text holds a newline ("Ċ" in byte-level BPE, "<0x0A>" in SentencePiece, "\n" in a
    word-level vocabulary, or merged ones such as ".Ċ"); computed once per tokenizer (~1 s for 150k tokens)."""
    return list(_newline_tokens(tokenizer))


class NewlineStop(StoppingCriteria):
    """Finish a sequence (a beam candidate too) at its first newline token. A stopping criterion rather than
    thousands of EOS ids: beam search keeps (1 + EOS ids) x beams candidates per step."""

    def __init__(self, ids: Sequence[int]):
        self.ids = torch.tensor(list(ids), dtype=torch.long)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        self.ids = self.ids.to(input_ids.device)
        return torch.isin(input_ids[:, -1], self.ids)  # (B,) bool


METRICS = {
    "embedded": "exact_match",
    "table": "exact_match",
    "vqa": "vqa_accuracy",
    "okvqa": "okvqa_accuracy",
}
METRICS["coco_karpathy"] = "cider_d"


@dataclass
class Scored:
    """A method's score in percent under the data kind's metric, each item's score (None where the metric has
    none per item: CIDEr-D), and further corpus figures (BLEU-4 and ROUGE-L for captions)."""

    metric: str
    value: float
    per_item: list[float | None]
    extra: dict[str, float]


TABLE_METRICS = {
    "exact_match": "table",
    "vqa_accuracy": "vqa",
    "okvqa_accuracy": "okvqa",
    "cider_d": "coco_karpathy",
}


def scored_as(source: dict) -> str:
    """The kind whose metric scores data source `source` (a `data.eval` mapping): its own kind, or for a table the
    kind of its `metric` (a VQAv2 table with ten answers per question scores as vqa)."""
    kind, metric = source["kind"], source.get("metric")
    if kind != "table" or metric is None:
        return kind
    if metric not in TABLE_METRICS:
        raise MimicError(f"data.eval.metric={metric!r}: choose one of {', '.join(TABLE_METRICS)}")
    return TABLE_METRICS[metric]


def score(kind: str, items: Sequence[Item], answers: Sequence[str]) -> Scored:
    """The dataset's standard metric: exact match, VQA accuracy (OK-VQA with its answer stemming) or CIDEr-D."""
    from pipeline.metrics import exact_match
    from pipeline.metrics.caption import score_captions
    from pipeline.metrics.vqa import vqa_accuracy

    if kind not in METRICS:
        raise MimicError(f"no metric for data kind {kind!r}")
    if kind == "coco_karpathy":
        ids = {item.id: i for i, item in enumerate(items)}
        scores = score_captions(
            {ids[i.id]: a for a, i in zip(answers, items)}, {ids[i.id]: list(i.answers) for i in items}
        )
        extra = {"bleu4": 100.0 * scores["Bleu_4"], "rouge_l": 100.0 * scores["ROUGE_L"]}
        return Scored(METRICS[kind], 100.0 * scores["CIDEr"], [None] * len(items), extra)
    if kind in ("embedded", "table"):
        per = [exact_match(a, item.answers) for a, item in zip(answers, items)]
    else:
        if kind == "okvqa":
            from pipeline.metrics.okvqa_stem import stem_answer

            answers = [stem_answer(a) for a in answers]
        per = [vqa_accuracy(a, list(item.answers)) for a, item in zip(answers, items)]
    return Scored(METRICS[kind], 100.0 * sum(per) / max(len(per), 1), list(per), {})


def official_results(kind: str, items: Sequence[Item], answers: Sequence[str]) -> list[dict]:
    """Predictions in the official result format: VQA `[{question_id, answer}]`, COCO `[{image_id, caption}]`,
    other kinds `[{id, answer}]`."""
    if kind in ("vqa", "okvqa"):
        return [{"question_id": int(i.id), "answer": a} for i, a in zip(items, answers)]
    if kind == "coco_karpathy":
        return [{"image_id": int(i.id), "caption": a} for i, a in zip(items, answers)]
    return [{"id": i.id, "answer": a} for i, a in zip(items, answers)]
