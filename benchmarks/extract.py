"""Extraction cost against plain teacher forwards, and the size of each cache codec, on the embedded model.

    .venv/bin/python benchmarks/extract.py          # 256 samples, k = 4; about a minute on 2 cores

"plain" runs the same batches (prompt assembly included) through the teacher with no hooks and no writes;
"extract" is the stage's own loop: hooks, gathering, background Zarr writes. Both in this process, alternated.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from pipeline.config import load_params
from pipeline.models import load_model
from pipeline.prompts import PromptBuilder, PromptTemplate
from pipeline.samples import teacher_batch, training_samples
from pipeline.splits import make_splits
from pipeline.teacher import model_inputs
from stages.extract import extract

ROOT = Path(__file__).resolve().parents[1]


def plain_forwards(overrides: list[str]) -> float:
    params = load_params(ROOT / "params.yaml", overrides)
    loaded = load_model(params.model.name, params.model.dtype, params.model.device)
    splits = make_splits(params.data)
    ex = params.extract
    samples = training_samples(splits.train, splits.support, ex.k, ex.m, ex.seed)
    builder = PromptBuilder(loaded.processor, loaded.adapter.family, PromptTemplate(params.prompt), 4096)
    for query in splits.train:  # as extract does before its loop: query rounds are encoded up front
        builder.round(query)
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, len(samples), ex.batch_size):
            batch, _ = teacher_batch(builder, samples, range(first, min(first + ex.batch_size, len(samples))))
            loaded.model(**model_inputs(batch, params.model.device))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=256)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    logging.disable(logging.INFO)
    torch.set_num_threads(2)
    base = [
        f"data.train={{kind: embedded, task: color, split: support, n: {200 + args.n_train}, seed: 0}}",
        f"data.n_train={args.n_train}",
        "data.n_support=200",
        f"extract.k={args.k}",
    ]
    plain, hooked, sizes = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            plain.append(plain_forwards(base))
            hooked.append(extract(ROOT / "params.yaml", Path(tmp) / f"run{r}.zarr", base)["seconds"])
        for codec in ("lossless", "int8"):
            stats = extract(
                ROOT / "params.yaml", Path(tmp) / f"{codec}.zarr", [*base, f"extract.codec={codec}"]
            )
            sizes[codec] = stats
    p, h = min(plain), min(hooked)
    print(
        f"embedded model, {args.n_train} samples, k={args.k}, best of {args.repeats}, torch {torch.__version__}"
    )
    print(f"{'plain forwards s':>16} {'extract s':>10} {'ratio':>6}")
    print(f"{p:>16.2f} {h:>10.2f} {h / p:>6.2f}")
    print(f"{'codec':<9} {'bytes/value':>11} {'compression':>11} {'MiB':>7}")
    for codec, s in sizes.items():
        print(
            f"{codec:<9} {s['bytes_per_value']:>11.3f} {s['compression_ratio']:>11.2f} {s['bytes_on_disk'] / 2**20:>7.2f}"
        )


if __name__ == "__main__":
    main()
