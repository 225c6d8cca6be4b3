"""Batched generation (left padding) and scoring with the metric each data kind is scored by."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from pipeline.data import Item
from pipeline.errors import MimicError
from pipeline.prompts import PromptBuilder, Segment
from pipeline.samples import collate_segments
from pipeline.teacher import model_inputs


@dataclass
class Generated:
    answers: list[str]
    seconds: float  # wall time of all generate calls
    prompt_tokens: list[int]  # non-padding prompt length of each sample


def generate_answers(
    model,
    builder: PromptBuilder,
    prompts: Sequence[Segment],
    batch_size: int,
    num_beams: int,
    max_new_tokens: int,
    desc: str = "generate",
) -> Generated:
    """Greedy (or beam) decoding of each prompt; the answer is the text before the first newline."""
    tokenizer = builder.processor.tokenizer
    newline = tokenizer.convert_tokens_to_ids("\n") if "\n" in tokenizer.get_vocab() else None
    stops = [t for t in (tokenizer.eos_token_id, newline) if t is not None]
    device = next(model.parameters()).device
    answers: list[str] = []
    seconds = 0.0
    for first in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
        batch = collate_segments(prompts[first : first + batch_size], builder)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **model_inputs(batch, device),
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                do_sample=False,
                eos_token_id=stops or None,
                pad_token_id=tokenizer.pad_token_id,
                # beams rank by summed log-probability (no length normalisation); greedy takes no such flag
                **({"length_penalty": 0.0} if num_beams > 1 else {}),
            )
        seconds += time.perf_counter() - start
        new = out[:, batch["input_ids"].shape[1] :]
        for text in tokenizer.batch_decode(new, skip_special_tokens=True):
            answers.append(text.split("\n")[0].strip())
    return Generated(answers, seconds, [len(p.input_ids) for p in prompts])


def score(kind: str, items: Sequence[Item], answers: Sequence[str]) -> tuple[float, list[float]]:
    """The dataset's standard metric in percent, and each item's score (CIDEr-D has none per item: NaN)."""
    from pipeline.metrics import exact_match
    from pipeline.metrics.caption import score_captions
    from pipeline.metrics.vqa import vqa_accuracy

    if kind in ("embedded", "table"):
        per = [exact_match(a, item.answers) for a, item in zip(answers, items)]
    elif kind in ("vqa", "okvqa"):
        if kind == "okvqa":
            from pipeline.metrics.okvqa_stem import stem_answer

            answers = [stem_answer(a) for a in answers]
        per = [vqa_accuracy(a, list(item.answers)) for a, item in zip(answers, items)]
    elif kind == "coco_karpathy":
        ids = {item.id: i for i, item in enumerate(items)}
        scores = score_captions(
            {ids[i.id]: a for a, i in zip(answers, items)}, {ids[i.id]: list(i.answers) for i in items}
        )
        return 100.0 * scores["CIDEr"], [float("nan")] * len(items)
    else:
        raise MimicError(f"no metric for data kind {kind!r}")
    return 100.0 * sum(per) / max(len(per), 1), per
