"""The answer stemming of OK-VQA v1.1, applied to predictions before VQA scoring (as the MimIC paper code does).

The original (open_flamingo's `OKVQAStemmer`, reused by the paper) tokenizes with nltk, tags parts of
speech with nltk's perceptron tagger, and for each token: takes a hand-made stem if the word is in its
table; else, for a word ending in "ing", WordNet's verb lemma; else, for a plural noun, `inflection`'s
singular. nltk's data cannot be downloaded here, so each step uses something that ships with its package:

* tokens: `pipeline.metrics.tokenize.treebank_words` (pure Python);
* the table: the original's, committed as `data/okvqa_manual_stems.txt`;
* "-ing" lemma: WordNet's rule (the shortest of the word, the word less "ing", the word less "ing" plus
  "e", and its irregular lemma, that is a verb) with lemminflect's verb lexicon standing in for WordNet's;
* "plural noun": lemminflect's lexicon says the word is an inflected noun form (not an auxiliary); a word
  it does not know counts as plural when it ends in a single "s", as the tagger's suffix guess does;
* singular: `inflection.singularize`, the same function the original calls.

docs/metrics.md gives the measured agreement of each replaced step with the nltk original.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files

import inflection
import lemminflect

from pipeline.metrics.tokenize import treebank_words


def _load_manual_stems() -> dict[str, str]:
    text = files("pipeline.metrics").joinpath("data/okvqa_manual_stems.txt").read_text(encoding="utf-8")
    pairs = (line.split("\t") for line in text.splitlines() if line and not line.startswith("# "))
    return {word: stem for word, stem in pairs}


_MANUAL_STEMS = _load_manual_stems()


def _is_verb(word: str) -> bool:
    return bool(word) and bool(lemminflect.getAllInflections(word, upos="VERB"))


def verb_lemma(word: str) -> str:
    """WordNet-style verb lemma of an -ing word: the shortest candidate the verb lexicon knows, else the word."""
    stem = word[:-3]
    candidates = [form for form in (word, stem, stem + "e") if _is_verb(form)]
    candidates += lemminflect.getLemma(word, upos="VERB", lemmatize_oov=False)
    return min(candidates, key=len) if candidates else word


def is_plural_noun(word: str) -> bool:
    """Stand-in for the tagger's NNS/NNPS: an inflected noun form in the lexicon, or an unknown word in -s."""
    lemmas = lemminflect.getAllLemmas(word)
    if not lemmas:
        lower = word.lower()
        return word.isalpha() and lower.endswith("s") and not lower.endswith(("ss", "us", "is"))
    if "AUX" in lemmas:
        return False
    nouns = lemmas.get("NOUN", ()) + lemmas.get("PROPN", ())
    return any(lemma != word for lemma in nouns)


@lru_cache(maxsize=1 << 16)
def stem_word(word: str) -> str:
    """Stem of one token by the OK-VQA v1.1 rules."""
    if word in _MANUAL_STEMS:
        return _MANUAL_STEMS[word]
    if word.endswith("ing"):
        return verb_lemma(word)
    if is_plural_noun(word):
        return inflection.singularize(word)
    return word


def stem_answer(answer: str) -> str:
    """An answer stemmed as OK-VQA v1.1's stemmed answers were: tokens stemmed, joined by single spaces."""
    return " ".join(stem_word(token) for token in treebank_words(answer))
