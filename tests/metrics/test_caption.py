"""Caption metrics: pycocoevalcap's scorers on our tokens, and the tokenizer against recorded Java output."""

from __future__ import annotations

from importlib.resources import files

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from pipeline.metrics.caption import score_captions
from pipeline.metrics.tokenize import ptb_caption_tokens, tokenize_caption, treebank_sentence, treebank_words

PREDICTIONS = {
    1: "A man riding a wave on a surfboard.",
    2: "Two dogs play with a red frisbee!",
    3: "A plate of food (rice, broccoli) on a table.",
}
REFERENCES = {
    1: ["A surfer rides a big wave.", "A man on a surfboard riding a wave.", "Someone surfing in the ocean."],
    2: ["Two dogs playing with a frisbee.", "A pair of dogs chase a red frisbee in the grass."],
    3: ["A plate with rice and broccoli.", "Food on a plate on a wooden table.", "A meal of rice, broccoli."],
    4: ["An image nobody predicted."],
}
# The same captions tokenized by hand (lower case, punctuation gone, parentheses as PTB writes them).
HAND_TOKENS = {
    1: ["a man riding a wave on a surfboard"],
    2: ["two dogs play with a red frisbee"],
    3: ["a plate of food -lrb- rice broccoli -rrb- on a table"],
}
HAND_REFERENCES = {
    1: ["a surfer rides a big wave", "a man on a surfboard riding a wave", "someone surfing in the ocean"],
    2: ["two dogs playing with a frisbee", "a pair of dogs chase a red frisbee in the grass"],
    3: ["a plate with rice and broccoli", "food on a plate on a wooden table", "a meal of rice broccoli"],
}


def test_cider_d_equals_pycocoevalcap_on_the_same_tokens() -> None:
    scores = score_captions(PREDICTIONS, REFERENCES)
    cider, _ = Cider().compute_score(HAND_REFERENCES, HAND_TOKENS)
    bleu, _ = Bleu(4).compute_score(HAND_REFERENCES, HAND_TOKENS, verbose=0)
    rouge, _ = Rouge().compute_score(HAND_REFERENCES, HAND_TOKENS)
    assert scores["CIDEr"] == cider
    assert scores["Bleu_4"] == bleu[3]
    assert scores["ROUGE_L"] == rouge
    assert scores["images"] == 3  # image 4 has no prediction and is not scored, as in COCOEvalCap
    assert 0 < scores["CIDEr"] < 10


def test_perfect_caption_scores_full_bleu_and_rouge() -> None:
    references = {7: ["a cat on a mat", "a cat on a mat"], 8: ["two birds in a tree", "two birds in a tree"]}
    predictions = {7: "A cat on a mat.", 8: "Two birds in a tree."}
    scores = score_captions(predictions, references)
    assert scores["Bleu_4"] == pytest.approx(1.0)
    assert scores["ROUGE_L"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("caption", "tokens"),
    [
        ("A man's hat.", "a man 's hat"),
        ("It isn't (really) a cat!", "it is n't -lrb- really -rrb- a cat"),
        ('A "stop" sign -- in the U.S.', "a stop sign in the u.s."),
        ("3.5 miles, 1,000 fans & a t-shirt", "3.5 miles 1,000 fans & a t-shirt"),
        ("The dog\u2019s bowl\u2026", "the dog 's bowl"),
    ],
)
def test_tokenize_caption(caption: str, tokens: str) -> None:
    assert tokenize_caption(caption) == tokens


def _reference_rows(name: str) -> list[list[str]]:
    text = files("pipeline.metrics").joinpath(f"data/{name}").read_text(encoding="utf-8")
    return [line.split("\t") for line in text.splitlines() if line and not line.startswith("# ")]


def test_ptb_tokens_agree_with_recorded_java_output_as_documented() -> None:
    counts: dict[str, list[int]] = {}
    for subset, caption, reference in _reference_rows("ptb_reference.txt"):
        agree = " ".join(ptb_caption_tokens(caption)) == reference
        counts.setdefault(subset, [0, 0])[0] += agree
        counts[subset][1] += 1
    assert counts == {"generated": [600, 600], "heldout": [77, 80]}  # docs/metrics.md reports these figures


def test_treebank_tokens_agree_with_recorded_nltk_output_as_documented() -> None:
    rows = _reference_rows("treebank_reference.txt")
    agree = sum(" ".join(treebank_sentence(text)) == reference for text, reference in rows)
    assert (agree, len(rows)) == (372, 374)


def test_treebank_words_splits_sentences_but_not_abbreviations() -> None:
    assert treebank_words("a dog. a cat.") == ["a", "dog", ".", "a", "cat", "."]
    assert treebank_words("mr. smith's dog in the u.s. today") == [
        "mr.",
        "smith",
        "'s",
        "dog",
        "in",
        "the",
        "u.s.",
        "today",
    ]
