"""VQA accuracy: one test per rule of the official evaluation (vqaEval.py), each on a case computed by hand."""

from __future__ import annotations

import random

import pytest

from pipeline.metrics import exact_match
from pipeline.metrics.okvqa_stem import stem_answer, verb_lemma
from pipeline.metrics.vqa import (
    VqaQuestion,
    normalize_answer,
    question_accuracy,
    round_half_away,
    score_vqa,
    vqa_accuracy,
)


def _question(
    qid: int, answers: list[str], qtype: str = "what is", atype: str = "other", keys=None
) -> VqaQuestion:
    return VqaQuestion(qid, qtype, atype, tuple(answers), keys)


# Rule: accuracy = mean over the 10 records of min(1, matches among the other 9 / 3).
@pytest.mark.parametrize(
    ("matching", "expected"),
    [
        (0, 0.0),
        (1, 0.3),  # 1 record sees 0 others, 9 records see 1: (0 + 9 * 1/3) / 10
        (2, 0.6),  # 2 records see 1, 8 records see 2: (2/3 + 16/3) / 10
        (3, 0.9),  # 3 records see 2, 7 records see 3: (2 + 7) / 10
        (4, 1.0),  # every record sees at least 3
    ],
)
def test_leave_one_out_over_ten_annotators(matching: int, expected: float) -> None:
    answers = ["cat"] * matching + ["dog"] * (10 - matching)
    assert vqa_accuracy("cat", answers) == pytest.approx(expected, abs=1e-12)


# Rule: newlines and tabs become spaces, then both ends are stripped (prediction and answers alike).
def test_whitespace_is_cleaned_even_when_answers_agree() -> None:
    assert vqa_accuracy("  yes\n", ["yes"] * 10) == 1.0
    assert vqa_accuracy("red\tcar", ["red car", "red car", "red car", "blue"] * 2 + ["red car"] * 2) == 1.0


# Rule (corner case): when all answers are the same string, nothing is normalized.
def test_no_normalization_when_all_answers_are_identical() -> None:
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_accuracy("yes.", ["yes"] * 10) == 0.0
    # One differing answer switches normalization on for prediction and answers.
    assert vqa_accuracy("Yes.", ["yes"] * 9 + ["no"]) == 1.0


# Rule: a punctuation mark is deleted when it touches a space somewhere in the string, else replaced by a space.
def test_punctuation_removed_or_spaced() -> None:
    assert normalize_answer("t-shirt") == "t shirt"
    assert normalize_answer("yes !") == "yes"
    assert normalize_answer("red,blue") == "red blue"
    # ", " occurs once, so every comma goes, also the one between letters.
    assert normalize_answer("a,b, c") == "ab c"


# Rule: a comma between digits anywhere makes every listed mark disappear.
def test_digit_comma_digit_deletes_all_marks() -> None:
    assert normalize_answer("1,000") == "1000"
    assert normalize_answer("1,000-2,000") == "10002000"


# Rule: periods not followed by a digit go, at most 32 of them (re.UNICODE passed as the count).
def test_periods_stripped_except_before_digits_and_after_32() -> None:
    assert normalize_answer("3.5") == "3.5"
    assert normalize_answer("u.s.a.") == "usa"
    assert normalize_answer("x." * 33) == "x" * 33 + "."


# Rule: lower case, number words to digits, articles dropped.
def test_number_words_and_articles() -> None:
    assert normalize_answer("The Two dogs") == "2 dogs"
    assert normalize_answer("none") == "0"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("eleven") == "eleven"


# Rule: contractions written without apostrophe get it back; capitalized keys never match after lower().
def test_contractions() -> None:
    assert normalize_answer("dont") == "don't"
    assert normalize_answer("Isnt it") == "isn't it"
    assert normalize_answer("Im") == "im"


# Rule: "the other records" are the records not equal as whole dicts, so identical records leave each other out.
def test_identical_records_without_answer_id_leave_each_other_out() -> None:
    answers = ["cat"] * 4 + ["dog"] * 6
    assert question_accuracy("cat", _question(1, answers)) == 1.0
    same = _question(1, answers, keys=("{}",) * 10)
    # cat records see no other cat (all four are "the same" record): 0; dog records see 4 cats: 1.
    assert question_accuracy("cat", same) == pytest.approx(0.6)


def _literal_accuracy(prediction: str, records: list[dict]) -> float:
    """The official loop written out literally: dict comparison, 100 comparisons per question."""
    accuracies = []
    for record in records:
        others = [item for item in records if item != record]
        accuracies.append(min(1, len([item for item in others if item["answer"] == prediction]) / 3))
    return sum(accuracies) / len(accuracies)


def test_fast_count_equals_literal_loop_on_random_records() -> None:
    rng = random.Random(0)
    for _ in range(300):
        records = [
            {"answer": rng.choice("abc"), "answer_confidence": rng.choice(["yes", "maybe"])}
            for _ in range(10)
        ]
        keys = tuple(f'{{"answer_confidence": "{r["answer_confidence"]}"}}' for r in records)
        question = _question(1, [r["answer"] for r in records], keys=keys)
        prediction = rng.choice("abcd")
        assert question_accuracy(prediction, question) == _literal_accuracy(prediction, records)


# Rule: figures are rounded like Python 2's round(): ties away from zero.
def test_overall_rounds_half_away_from_zero() -> None:
    questions = [_question(i, ["yes"] * 10) for i in range(32)]
    predictions = {i: ("yes" if i == 0 else "no") for i in range(32)}
    assert score_vqa(predictions, questions).overall == 3.13  # 100 / 32 = 3.125; Python 3 round() says 3.12
    assert round_half_away(2.675) == 2.67  # 2.675 is stored just below the tie


# Rule: overall, per answer type and per question type are means of per-question accuracy, in percent.
def test_per_type_breakdown() -> None:
    questions = [
        _question(1, ["yes"] * 10, "is the", "yes/no"),
        _question(2, ["no"] * 10, "is the", "yes/no"),
        _question(3, ["2"] * 3 + ["3"] * 7, "how many", "number"),
        _question(4, ["red"] * 1 + ["blue"] * 9, "what color", "other"),
    ]
    predictions = {1: "yes", 2: "yes", 3: "two", 4: "red"}
    scores = score_vqa(predictions, questions)
    assert scores.per_question == {1: 100.0, 2: 0.0, 3: 90.0, 4: 30.0}
    assert scores.per_answer_type == {"yes/no": 50.0, "number": 90.0, "other": 30.0}
    assert scores.per_question_type == {"is the": 50.0, "how many": 90.0, "what color": 30.0}
    assert scores.overall == 55.0
    assert scores.to_json()["perAnswerType"] == scores.per_answer_type


def test_exact_match_uses_the_normalization() -> None:
    assert exact_match("The Two", ["2", "two dogs"]) == 1.0
    assert exact_match("three", ["2"]) == 0.0


# OK-VQA v1.1 stemming of predictions.
@pytest.mark.parametrize(
    ("answer", "stemmed"),
    [
        ("skiing", "ski"),  # -ing: verb lemma
        ("hot dogs", "hot dog"),  # plural noun: singular
        ("leaves", "leaf"),  # from the hand-made table
        ("christmas", "christmas"),  # the table keeps it
        ("is", "is"),  # not a plural noun
        ("coding", "code"),  # the table overrides WordNet's "cod"
        ("men's room", "man 's room"),  # tokenized like nltk
    ],
)
def test_okvqa_stemming(answer: str, stemmed: str) -> None:
    assert stem_answer(answer) == stemmed


def _reference_rows(name: str) -> list[list[str]]:
    from importlib.resources import files

    text = files("pipeline.metrics").joinpath(f"data/{name}").read_text(encoding="utf-8")
    return [line.split("\t") for line in text.splitlines() if line and not line.startswith("# ")]


def test_ing_lemmas_agree_with_wordnet_as_documented() -> None:
    rows = _reference_rows("wordnet_ing_lemmas.txt")
    agree = sum(verb_lemma(word) == lemma for word, lemma in rows)
    assert (agree, len(rows)) == (3670, 3866)  # docs/metrics.md reports this figure
