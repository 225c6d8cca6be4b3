"""The embedded default: a tiny LLaVA (Qwen2 text, CLIP vision) pretrained here for in-context learning.

Its weights and processor files ship in MODEL_DIR and load like any checkpoint:
`AutoModelForImageTextToText.from_pretrained(MODEL_DIR)`, `AutoProcessor.from_pretrained(MODEL_DIR)`.
`stages/build_embedded.py` regenerates them; `docs/embedded.md` records how long that took and the
accuracies it reached. The task suite it was trained for is re-exported here.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.embedded.tasks import (
    AMBIGUOUS_QUESTION,
    ATTRIBUTES,
    EXPLICIT_QUESTIONS,
    IMAGE_SIZE,
    SPLITS,
    TASKS,
    Item,
    make_items,
    render,
)

EMBEDDED_NAME = "embedded"
MODEL_DIR: Path = Path(__file__).resolve().parent / "assets"

__all__ = [
    "AMBIGUOUS_QUESTION",
    "ATTRIBUTES",
    "EMBEDDED_NAME",
    "EXPLICIT_QUESTIONS",
    "IMAGE_SIZE",
    "MODEL_DIR",
    "SPLITS",
    "TASKS",
    "Item",
    "make_items",
    "render",
]
