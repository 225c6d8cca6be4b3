"""A procedurally generated few-shot task suite: one rendered object per image, one attribute per task.

Every image shows one object with a colour, a shape, a size and a position. A task names the attribute
that answers the question. The evaluation question ("What is this?") is the same for every task, so
only the demonstrations say which attribute is asked for; an explicit variant ("What color is it?")
names it and serves the pretraining curriculum. One demonstration settles such a task.

A noisy task (`color_noisy`, ...) asks the same, but half of its support items (NOISE) answer another
attribute of their image, as if their annotator had read another question; its query items are clean. One
demonstration then shows the asked attribute only with probability 1/2: k-shot ICL has to take the most
frequent attribute of k demonstrations, right more often as k grows (an ideal reader: 50% at k = 1 and 2,
64% at 4, 77% at 8, 90% at 16), while a method trained on many demonstration sets and training queries can
know the attribute for sure.

Support and query items come from independent random streams (the split is part of the seed), and every
image carries per-pixel noise, so a query image never repeats a support image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 16  # pixels per side of a rendered image
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down, so small shapes keep their outline

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": ("red", "green", "blue", "yellow"),
    "shape": ("circle", "square", "triangle", "cross"),
    "size": ("big", "small"),
    "position": ("left", "right"),
}
NOISE = 0.5  # share of a noisy task's support items that answer another attribute of their image
NOISY_SUFFIX = "_noisy"
TASKS: tuple[str, ...] = (*ATTRIBUTES, *(task + NOISY_SUFFIX for task in ATTRIBUTES))
SPLITS: tuple[str, ...] = ("support", "query")

AMBIGUOUS_QUESTION = "What is this?"
EXPLICIT_QUESTIONS: dict[str, str] = {
    "color": "What color is it?",
    "shape": "What shape is it?",
    "size": "What size is it?",
    "position": "Where is it?",
}

_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 40),
    "green": (45, 190, 60),
    "blue": (50, 85, 225),
    "yellow": (225, 210, 45),
}
_RADIUS: dict[str, tuple[float, float]] = {"big": (5.0, 6.0), "small": (2.8, 3.4)}  # pixels, uniform range
_MARGIN = 0.3  # pixels kept free between an object and the image border


@dataclass(frozen=True)
class Item:
    """One question about one image; `answers` holds the accepted answers (here always one word)."""

    id: str
    image: Image.Image
    question: str
    answers: tuple[str, ...]
    task: str


def render(color: str, shape: str, size: str, position: str, rng: np.random.Generator) -> Image.Image:
    """Draw one object on a noisy dark background; `rng` jitters placement, shade and noise.

    Returns an RGB image of IMAGE_SIZE x IMAGE_SIZE pixels.
    """
    radius = rng.uniform(*_RADIUS[size])
    half = IMAGE_SIZE / 2
    x_left = rng.uniform(radius + _MARGIN, half - 1.5)  # centre well inside the left half
    cx = x_left if position == "left" else IMAGE_SIZE - x_left
    cy = rng.uniform(radius + _MARGIN, IMAGE_SIZE - radius - _MARGIN)
    mask = _shape_mask(shape, cx, cy, radius)  # (H, W) in [0, 1]

    background = rng.uniform(0, 70) + rng.normal(0, 6, size=(IMAGE_SIZE, IMAGE_SIZE, 1))
    shade = np.asarray(_RGB[color], dtype=np.float64) + rng.uniform(-25, 25, size=3)
    pixels = background * (1 - mask[..., None]) + shade * mask[..., None]
    pixels += rng.normal(0, 6, size=pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")


def _shape_mask(shape: str, cx: float, cy: float, radius: float) -> np.ndarray:
    """Coverage of `shape` centred at (cx, cy) with the given radius, in pixels: float array [H, W]."""
    s = SUPERSAMPLE
    canvas = Image.new("L", (IMAGE_SIZE * s, IMAGE_SIZE * s), 0)
    draw = ImageDraw.Draw(canvas)
    x, y, r = cx * s, cy * s, radius * s
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    elif shape == "square":
        h = 0.85 * r
        draw.rectangle((x - h, y - h, x + h, y + h), fill=255)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x - r, y + 0.8 * r), (x + r, y + 0.8 * r)], fill=255)
    elif shape == "cross":
        t = 0.35 * r
        draw.rectangle((x - r, y - t, x + r, y + t), fill=255)
        draw.rectangle((x - t, y - r, x + t, y + r), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {ATTRIBUTES['shape']}")
    small = canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64) / 255.0


def sample_scene(rng: np.random.Generator) -> tuple[dict[str, str], Image.Image]:
    """Draw every attribute uniformly at random and render the scene: (attributes by task, image)."""
    attributes = {task: values[rng.integers(len(values))] for task, values in ATTRIBUTES.items()}
    return attributes, render(rng=rng, **attributes)


def attribute_of(task: str) -> str:
    """The attribute a task asks for (a noisy task asks for its clean task's)."""
    return task.removesuffix(NOISY_SUFFIX)


def split_rng(task: str, split: str, seed: int) -> np.random.Generator:
    """The random stream of one (task, split, seed): streams of different splits never coincide."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {TASKS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
    return np.random.default_rng([seed, SPLITS.index(split), TASKS.index(task)])


def make_items(task: str, split: str, n: int, seed: int, explicit: bool = False) -> list[Item]:
    """`n` items of one task and split, deterministic given the arguments; ids are f"{task}-{split}-{i}".

    With `explicit=False` the question is the ambiguous one shared by all tasks. A noisy task's support items
    answer another attribute (uniformly one of the other three) with probability NOISE, drawn from a stream of
    their own, so its images are those of the same seed whatever the noise.
    """
    rng = split_rng(task, split, seed)
    attribute = attribute_of(task)
    question = EXPLICIT_QUESTIONS[attribute] if explicit else AMBIGUOUS_QUESTION
    noisy = task != attribute and split == "support"
    noise = np.random.default_rng([seed, SPLITS.index(split), TASKS.index(task), 1])
    others = [other for other in ATTRIBUTES if other != attribute]
    items = []
    for index in range(n):
        attributes, image = sample_scene(rng)
        answered = attribute
        if noisy and noise.random() < NOISE:
            answered = others[noise.integers(len(others))]
        items.append(Item(f"{task}-{split}-{index}", image, question, (attributes[answered],), task))
    return items
