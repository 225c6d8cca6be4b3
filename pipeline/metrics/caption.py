"""Caption metrics with pycocoevalcap's own scorers: CIDEr-D, BLEU-4 and ROUGE-L.

pycocoevalcap's `Cider` is CIDEr-D (clipped n-gram counts, Gaussian length penalty with sigma 6, x10),
with document frequencies taken from the references of the scored images, as COCOEvalCap does. Only the
tokenizer differs from the official pipeline: `tokenize_caption` is pure Python where pycocoevalcap runs
the Stanford PTBTokenizer through Java; docs/metrics.md gives the measured difference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from pipeline.metrics.tokenize import tokenize_caption

CAPTION_METRICS = ("CIDEr", "Bleu_4", "ROUGE_L")


def score_tokenized(
    references: Mapping[int, list[str]], predictions: Mapping[int, list[str]]
) -> dict[str, float]:
    """CIDEr-D, BLEU-4 and ROUGE-L of already tokenized captions, keyed by image: `{id: [caption]}` each."""
    cider, _ = Cider().compute_score(references, predictions)
    bleu, _ = Bleu(4).compute_score(references, predictions, verbose=0)
    rouge, _ = Rouge().compute_score(references, predictions)
    return {"CIDEr": float(cider), "Bleu_4": float(bleu[3]), "ROUGE_L": float(rouge)}


def score_captions(
    predictions: Mapping[int, str], references: Mapping[int, Sequence[str]]
) -> dict[str, float]:
    """Score one predicted caption per image against that image's references (COCOEvalCap's figures).

    Every predicted image must have references; images without a prediction are not scored, as in
    COCOEvalCap, which evaluates the images of the results file.
    """
    if not predictions:
        raise ValueError("score_captions needs at least one prediction")
    tokenized_predictions = {image: [tokenize_caption(caption)] for image, caption in predictions.items()}
    tokenized_references = {
        image: [tokenize_caption(text) for text in references[image]] for image in predictions
    }
    scores = score_tokenized(tokenized_references, tokenized_predictions)
    return {**scores, "images": len(predictions)}
