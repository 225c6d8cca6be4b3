"""Task metrics, one implementation behind both `mimic score` and `mimic evaluate`.

`vqa` (official VQA accuracy), `okvqa_stem` (OK-VQA v1.1 answer stemming), `caption` (CIDEr-D, BLEU-4,
ROUGE-L via pycocoevalcap), `chair` (object hallucination), `tokenize` (the pure-Python tokenizers they
share) and `io` (loading the released JSON layouts with one-line errors).
"""

from __future__ import annotations

from collections.abc import Iterable

from pipeline.metrics.vqa import normalize_answer


def exact_match(prediction: str, answers: Iterable[str]) -> float:
    """1.0 when the prediction equals one of the answers after the VQA normalization, else 0.0."""
    target = normalize_answer(prediction)
    return float(any(normalize_answer(answer) == target for answer in answers))


__all__ = ["exact_match", "normalize_answer"]
