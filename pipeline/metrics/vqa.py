"""VQA accuracy exactly as the official evaluation computes it (GT-Vision-Lab/VQA, vqaEval.py, commit a013f00).

The rules, in the order the official code applies them to one question:

1. Newlines and tabs become spaces and the ends are stripped, in the prediction and in every answer.
2. Only when the ten answers are not all the same string are the prediction and the answers normalized
   (punctuation, then number words, articles and contractions); otherwise the raw strings are compared.
3. For each of the ten answer records, count the *other* records equal to the prediction; the question's
   accuracy is the mean over the ten of min(1, count / 3). "Other" means every record not equal to this
   one as a whole dict, so two records with identical fields (no `answer_id`) leave out each other too.
4. Sums are plain left-to-right float sums, and figures are rounded half away from zero (Python 2's
   `round`), so a mean of exactly 3.125 % is reported as 3.13, not Python 3's 3.12.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from functools import lru_cache
from importlib.resources import files

_PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
# The official code ran under Python 2, where \d matched ASCII digits only.
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)", re.ASCII)
# "(?!<=\d)" is a lookahead (a typo for a lookbehind in the original) that never fires: the pattern strips
# every period not followed by a digit.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)", re.ASCII)
# The original passes re.UNICODE (= 32) as `sub`'s positional *count*, so at most 32 periods go.
_PERIOD_LIMIT = 32


def _load_contractions() -> dict[str, str]:
    text = files("pipeline.metrics").joinpath("data/vqa_contractions.txt").read_text(encoding="utf-8")
    pairs = (line.split("\t") for line in text.splitlines() if line and not line.startswith("# "))
    return {written: normalized for written, normalized in pairs}


_CONTRACTIONS = _load_contractions()


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _strip_punctuation(text: str) -> str:
    """processPunctuation: drop a mark when it touches a space (or a digit,digit appears), else space it."""
    out = text
    remove_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in _PUNCTUATION:
        if mark not in out:
            continue
        if remove_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=_PERIOD_LIMIT)


def _digits_articles_contractions(text: str) -> str:
    """processDigitArticle: lower case, number words to digits, drop articles, restore apostrophes."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


@lru_cache(maxsize=1 << 20)
def _process(text: str) -> str:
    return _digits_articles_contractions(_strip_punctuation(text))


def normalize_answer(text: str) -> str:
    """The official normalization of one answer: whitespace, punctuation, number words, articles, contractions."""
    return _process(_clean(text))


@dataclass(frozen=True)
class VqaQuestion:
    """One annotated question: its types and its ground-truth answer records (ten in the released sets).

    `record_keys` holds, per answer, the record's other fields in a canonical form; it is None when those
    are all distinct (the released files, through `answer_id`), which is the fast common case.
    """

    question_id: int
    question_type: str
    answer_type: str
    answers: tuple[str, ...]
    record_keys: tuple[str, ...] | None = None


def _leave_one_out(prediction: str, answers: Sequence[str], record_keys: Sequence[str] | None) -> float:
    """Mean over the answer records of min(1, matches among the other records / 3)."""
    hits = answers.count(prediction)
    total = 0.0
    for i, answer in enumerate(answers):
        matches = hits
        if answer == prediction:
            if record_keys is None:
                matches -= 1
            else:  # every record equal to this one (same answer, same other fields) is left out
                matches -= sum(
                    1
                    for j, other in enumerate(answers)
                    if other == prediction and record_keys[j] == record_keys[i]
                )
        total += min(1.0, matches / 3)
    return total / len(answers)


def question_accuracy(prediction: str, question: VqaQuestion) -> float:
    """Accuracy (0..1) of one prediction on one annotated question, official rules 1-3."""
    answers = [_clean(answer) for answer in question.answers]
    prediction = _clean(prediction)
    if len(set(answers)) > 1:
        answers = [_process(answer) for answer in answers]
        prediction = _process(prediction)
    return _leave_one_out(prediction, answers, question.record_keys)


def vqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """Accuracy (0..1) of one prediction against its ground-truth answers, each one annotator's record."""
    if not gt_answers:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    question = VqaQuestion(question_id=0, question_type="", answer_type="", answers=tuple(gt_answers))
    return question_accuracy(prediction, question)


def round_half_away(value: float, digits: int = 2) -> float:
    """Python 2's round(): the exact binary value rounded, ties away from zero (3.125 -> 3.13)."""
    quantum = Decimal(1).scaleb(-digits)
    return float(Decimal(value).quantize(quantum, rounding=ROUND_HALF_UP))


def _percent(values: Sequence[float]) -> float:
    total = 0.0
    for value in values:
        total += value
    return round_half_away(100 * total / len(values))


@dataclass
class VqaScores:
    """Figures as the official tool reports them: percent, two decimals."""

    overall: float
    per_answer_type: dict[str, float]
    per_question_type: dict[str, float]
    per_question: dict[int, float] = field(repr=False)

    def to_json(self) -> dict:
        """The official result keys (`overall`, `perAnswerType`, `perQuestionType`) plus the question count."""
        return {
            "overall": self.overall,
            "perAnswerType": self.per_answer_type,
            "perQuestionType": self.per_question_type,
            "questions": len(self.per_question),
        }


def score_vqa(predictions: Mapping[int, str], questions: Iterable[VqaQuestion]) -> VqaScores:
    """Score every question in `questions` (in that order) with its prediction; every id must be predicted."""
    accuracies: list[float] = []
    by_answer_type: dict[str, list[float]] = {}
    by_question_type: dict[str, list[float]] = {}
    per_question: dict[int, float] = {}
    for question in questions:
        accuracy = question_accuracy(predictions[question.question_id], question)
        accuracies.append(accuracy)
        by_question_type.setdefault(question.question_type, []).append(accuracy)
        by_answer_type.setdefault(question.answer_type, []).append(accuracy)
        per_question[question.question_id] = round_half_away(100 * accuracy)
    if not accuracies:
        raise ValueError("score_vqa needs at least one question")
    return VqaScores(
        overall=_percent(accuracies),
        per_answer_type={name: _percent(values) for name, values in by_answer_type.items()},
        per_question_type={name: _percent(values) for name, values in by_question_type.items()},
        per_question=per_question,
    )
