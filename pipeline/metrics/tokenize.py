"""Pure-Python tokenizers standing in for the ones the reference metric code calls.

`treebank_words` plays the part of nltk's `word_tokenize` (used by the OK-VQA stemmer and by CHAIR);
`ptb_caption_tokens` plays the part of the Stanford PTBTokenizer that pycocoevalcap runs through Java
(`-preserveLines -lowerCase`, then its punctuation filter). How far each one is from the original,
measured on recorded outputs of the originals, is in docs/metrics.md.
"""

from __future__ import annotations

import re

# ---------------------------------------------------------------- nltk-like (Treebank) word tokenizer

# Short abbreviations whose final period is not a sentence end (punkt's English model knows these).
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "mt", "etc", "inc", "ltd", "co"})
_OPEN_DOUBLE_QUOTE = re.compile(r'(^|[\s(\[{<])"')
_PAD_ALWAYS = re.compile(r"(\.\.\.|--|[;@#$%&?!*()\[\]{}<>\u201c\u201d\u2018\u2019])")
_OPEN_SINGLE_QUOTE = re.compile(r"(?<!\S)'(?=[a-zA-Z])(?!(?:[sSmMdD]|ll|re|ve)\b|n')")
_COMMA_COLON = re.compile(r"([:,])(?=\D|$)")
_FINAL_PERIOD = re.compile(r"(?<!\.)\.(?=[\])}>\"']*\s*$)")
_QUOTE_BEFORE_SPACE = re.compile(r"(?<=[^'])' ")
_CLITIC_SHORT = re.compile(r"(?<=[^' ])('[sSmMdD]|') ")
_CLITIC_LONG = re.compile(r"(?<=[^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ")
_FUSED = [
    re.compile(pattern, re.IGNORECASE)
    for pattern in (
        r"\b(can)(not)\b",
        r"\b(d)('ye)\b",
        r"\b(gim)(me)\b",
        r"\b(gon)(na)\b",
        r"\b(got)(ta)\b",
        r"\b(lem)(me)\b",
        r"\b(more)('n)\b",
        r"\b(wan)(na)(?=\s)",
    )
]


def _sentence_end(token: str) -> bool:
    """Whether a token ending in '.' closes a sentence (as punkt decides for ordinary words)."""
    stem = token[:-1]
    return bool(stem) and "." not in stem and stem.lower() not in _ABBREVIATIONS and stem[-1].isalnum()


def split_sentences(text: str) -> list[str]:
    """Split at a period that ends a word followed by white space; a light stand-in for punkt."""
    sentences, current = [], []
    for token in text.split():
        current.append(token)
        if token.endswith(".") and _sentence_end(token):
            sentences.append(" ".join(current))
            current = []
    if current:
        sentences.append(" ".join(current))
    return sentences


def treebank_sentence(sentence: str) -> list[str]:
    """Tokens of one sentence by the Treebank rules of nltk's `NLTKWordTokenizer`."""
    text = _OPEN_DOUBLE_QUOTE.sub(r"\1 `` ", sentence)
    text = text.replace('"', " '' ")
    text = _OPEN_SINGLE_QUOTE.sub("' ", text)
    text = _PAD_ALWAYS.sub(r" \1 ", text)
    text = _COMMA_COLON.sub(r" \1 ", text)
    text = _FINAL_PERIOD.sub(" . ", text)
    text = _QUOTE_BEFORE_SPACE.sub(" ' ", f" {text} ")
    text = _CLITIC_SHORT.sub(r" \1 ", text)
    text = _CLITIC_LONG.sub(r" \1 ", text)
    for pattern in _FUSED:
        text = pattern.sub(r"\1 \2", text)
    return text.split()


def treebank_words(text: str) -> list[str]:
    """Word tokens as nltk's `word_tokenize` gives them: clitics and punctuation split off, case kept."""
    return [token for sentence in split_sentences(text) for token in treebank_sentence(sentence)]


# ---------------------------------------------------------------- Stanford PTB tokenizer for captions

# pycocoevalcap drops these tokens. Its list also names -LRB- and friends, but the Java tokenizer has
# already lower-cased them by then, so "-lrb-" and the other bracket tokens stay; we keep that quirk.
PTB_DROPPED = frozenset({"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"})
_SYMBOLS = {'"': "''", "(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_CHARACTER_MAP = str.maketrans(
    {
        "\u201c": '"',
        "\u201d": '"',
        "\u2018": "'",
        "\u2019": "'",
        "\u2014": "--",
        "\u2013": "--",
        "\u2026": "...",
    }
)
_PTB_TOKEN = re.compile(
    r"""
    (?:[a-z]\.){2,}                       # initialisms: u.s. a.m.
    | \b(?:mrs?|ms|dr|st|jr|sr|vs|[a-z])\.  # abbreviations and initials keep their period
    | \d+(?:[.,:/]\d+)*(?!\w)             # numbers: 3.5 1,000 10:30 1/2
    | 'n' | 't(?=is\b|was\b)              # rock 'n' roll, 'tis
    | [\w@](?:[\w@]|[-'&/](?=\w))*        # words: t-shirt o'clock here/there at&t
    | \.\.\.+ | --+ | [?!]{2,}            # ellipsis, dashes, runs of ?!
    | ([^\w\s])\1*                        # any other symbol, repeats kept together (**)
    """,
    re.VERBOSE,
)
_PTB_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_PTB_FUSED = re.compile(r"^(can)(not)$|^(gon|wan)(na)$|^(got)(ta)$|^(lem|gim)(me)$")


def _split_ptb_word(word: str) -> list[str]:
    fused = _PTB_FUSED.match(word)
    if fused:
        return [part for part in fused.groups() if part]
    clitic = _PTB_CLITIC.match(word)
    if clitic and clitic.group(1) not in ("'", "o"):
        return [clitic.group(1), clitic.group(2)]
    return [word]


def ptb_caption_tokens(caption: str) -> list[str]:
    """Tokens of one caption as pycocoevalcap's PTBTokenizer returns them: lower case, punctuation gone."""
    text = caption.lower().translate(_CHARACTER_MAP)
    tokens: list[str] = []
    for match in _PTB_TOKEN.finditer(text):
        token = match.group(0)
        if token in _SYMBOLS:
            tokens.append(_SYMBOLS[token])
        elif token[0].isalnum() or token[0] in "@'":
            tokens.extend(_split_ptb_word(token))
        elif token.startswith("..."):
            tokens.append("...")
        else:
            tokens.append(token)
    return [token for token in tokens if token not in PTB_DROPPED]


def tokenize_caption(caption: str) -> str:
    """One caption as the space-joined token string that pycocoevalcap's scorers take."""
    return " ".join(ptb_caption_tokens(caption.replace("\n", " ")))
