"""CHAIR object hallucination (Rohrbach et al., 2018): CHAIR-s, CHAIR-i and object recall of captions.

A caption's objects are found as in the original `chair.py`: lower-case, tokenize, singularize each word,
merge the double words below, drop "seat" when "toilet" is there, then keep the words of the synonym list
(`data/chair_synonyms.txt`, verbatim, quirks included: " motor bike" and " cheesecake" keep a leading space
there and so never match) and map each to its MSCOCO category.

Singularization is lemminflect's noun lemma where the original used `pattern.en.singularize` (not
installable here); a word already in the synonym list is kept as written ("scissors", "skis", "people").
docs/metrics.md gives the measured effect on the plurals of the synonym list.

CHAIR-i = hallucinated mentions / all object mentions; CHAIR-s = captions with a hallucinated mention /
captions; recall = ground-truth objects mentioned / ground-truth objects, summed over captions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.resources import files

import lemminflect

from pipeline.metrics.tokenize import treebank_words

_DOUBLE_WORDS = (
    "motor bike",
    "motor cycle",
    "air plane",
    "traffic light",
    "street light",
    "traffic signal",
    "stop light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "suit case",
    "sports ball",
    "baseball bat",
    "baseball glove",
    "tennis racket",
    "wine glass",
    "hot dog",
    "cell phone",
    "mobile phone",
    "teddy bear",
    "hair drier",
    "potted plant",
    "laptop computer",
    "stove top oven",
    "home plate",
    "train track",
)
# Qualifiers that would otherwise fire "person": "baby bird" is a bird, "passenger jet" a jet.
_ANIMALS = (
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "animal",
    "cub",
)
_VEHICLES = ("jet", "train")


def _double_word_map() -> dict[str, str]:
    pairs = {word: word for word in _DOUBLE_WORDS}
    for animal in _ANIMALS:
        pairs[f"baby {animal}"] = animal
        pairs[f"adult {animal}"] = animal
    for vehicle in _VEHICLES:
        pairs[f"passenger {vehicle}"] = vehicle
    pairs.update({"bow tie": "tie", "toilet seat": "toilet", "wine glas": "wine glass"})
    return pairs


def _load_synonyms() -> dict[str, str]:
    """Every synonym (category names included) mapped to its MSCOCO category, parsed as the original does."""
    text = files("pipeline.metrics").joinpath("data/chair_synonyms.txt").read_text(encoding="utf-8")
    category_of: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("# "):
            continue
        words = line.strip().split(", ")
        for word in words:
            category_of[word] = words[0]
    return category_of


CATEGORY_OF = _load_synonyms()
_DOUBLE_WORD_MAP = _double_word_map()


@lru_cache(maxsize=1 << 16)
def _singular(word: str) -> str:
    if word in CATEGORY_OF:
        return word
    lemmas = lemminflect.getLemma(word, upos="NOUN")
    return lemmas[0] if lemmas else word


def caption_objects(caption: str) -> list[tuple[str, str]]:
    """The MSCOCO objects a caption mentions, in order, as (word as matched, category) pairs."""
    words = [_singular(word) for word in treebank_words(caption.lower())]
    merged: list[str] = []
    i = 0
    while i < len(words):
        pair = " ".join(words[i : i + 2])
        if pair in _DOUBLE_WORD_MAP:
            merged.append(_DOUBLE_WORD_MAP[pair])
            i += 2
        else:
            merged.append(words[i])
            i += 1
    if "toilet" in merged and "seat" in merged:
        merged = [word for word in merged if word != "seat"]
    return [(word, CATEGORY_OF[word]) for word in merged if word in CATEGORY_OF]


def objects_from_instances(
    image_ids: Iterable[int], labels: Iterable[tuple[int, str]]
) -> dict[int, set[str]]:
    """Ground-truth categories per image from (image id, COCO category name) pairs; unlabeled images get none."""
    objects: dict[int, set[str]] = {image: set() for image in image_ids}
    for image, name in labels:
        objects.setdefault(image, set()).add(CATEGORY_OF[name])
    return objects


def add_caption_objects(objects: dict[int, set[str]], captions: Mapping[int, Iterable[str]]) -> None:
    """Add the objects that ground-truth captions mention, as the original CHAIR does besides instances."""
    for image, texts in captions.items():
        if image in objects:
            for text in texts:
                objects[image].update(category for _, category in caption_objects(text))


@dataclass
class CaptionChair:
    """One caption's CHAIR details."""

    image_id: int
    mentioned: list[str]
    hallucinated: list[str]
    ground_truth: list[str]


@dataclass
class ChairScores:
    """CHAIR-s, CHAIR-i and recall as fractions (0..1), with the counts they come from."""

    chair_s: float
    chair_i: float
    recall: float
    captions: int
    mentions: int
    hallucinated_mentions: int
    per_caption: list[CaptionChair] = field(repr=False)

    def to_json(self) -> dict:
        """All figures, and per caption the mentioned, hallucinated and ground-truth categories."""
        return {
            "CHAIRs": self.chair_s,
            "CHAIRi": self.chair_i,
            "recall": self.recall,
            "captions": self.captions,
            "mentions": self.mentions,
            "hallucinated_mentions": self.hallucinated_mentions,
            "per_caption": [vars(entry) for entry in self.per_caption],
        }


def score_chair(predictions: Mapping[int, str], ground_truth: Mapping[int, set[str]]) -> ChairScores:
    """CHAIR of one caption per image against the image's ground-truth categories."""
    if not predictions:
        raise ValueError("score_chair needs at least one caption")
    mentions = hallucinated = hallucinated_captions = covered = gt_total = 0
    per_caption = []
    for image, caption in predictions.items():
        truth = ground_truth[image]
        categories = [category for _, category in caption_objects(caption)]
        wrong = [category for category in categories if category not in truth]
        mentions += len(categories)
        hallucinated += len(wrong)
        hallucinated_captions += bool(wrong)
        covered += len(truth.intersection(categories))
        gt_total += len(truth)
        per_caption.append(CaptionChair(image, categories, wrong, sorted(truth)))
    return ChairScores(
        chair_s=hallucinated_captions / len(predictions),
        chair_i=hallucinated / mentions if mentions else 0.0,
        recall=covered / gt_total if gt_total else 0.0,
        captions=len(predictions),
        mentions=mentions,
        hallucinated_mentions=hallucinated,
        per_caption=per_caption,
    )
