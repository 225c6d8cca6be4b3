"""Extraction cost against plain teacher forwards, and the size of each cache codec, on the embedded model.

    .venv/bin/python benchmarks/extract.py          # 512 samples, k = 4, 7 rounds; about 2 minutes on 2 cores

"plain" runs the same batches (prompt assembly included) through the teacher with no hooks and no writes;
"hooks" adds the recording hooks and the gathering of query+answer states, still no writes; "extract" is the
stage's own loop: hooks, gathering, staged background Zarr writes. All three in this process, interleaved
round by round; the ratios compare best times (the least disturbed by other processes) and median times.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipeline.config import load_params
from pipeline.models import load_model
from pipeline.prompts import PromptBuilder, PromptTemplate
from pipeline.samples import teacher_batch, training_samples
from pipeline.splits import make_splits
from pipeline.teacher import forward_query_states, model_inputs
from stages.extract import extract

ROOT = Path(__file__).resolve().parents[1]


def teacher_forwards(overrides: list[str], hooks: bool) -> float:
    """Seconds for the extract loop's forwards without writes; with `hooks`, states are recorded and gathered."""
    params = load_params(ROOT / "params.yaml", overrides)
    loaded = load_model(params.model.name, params.model.dtype, params.model.device)
    splits = make_splits(params.data)
    ex = params.extract
    samples = training_samples(splits.train, splits.support, ex.k, ex.m, ex.seed)
    builder = PromptBuilder(loaded.processor, loaded.adapter.family, PromptTemplate(params.prompt), 4096)
    for query in splits.train:  # as extract does before its loop: query rounds are encoded up front
        builder.round(query)
    layers = list(range(loaded.adapter.geometry.num_layers))
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, len(samples), ex.batch_size):
            batch, lengths = teacher_batch(
                builder, samples, range(first, min(first + ex.batch_size, len(samples)))
            )
            if hooks:
                forward_query_states(
                    loaded.model, loaded.adapter, batch, lengths, ex.site, layers, ex.topk, all_logits=False
                )
            else:
                loaded.model(**model_inputs(batch, params.model.device))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=512)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    logging.disable(logging.INFO)
    torch.set_num_threads(2)
    base = [
        f"data.train={{kind: embedded, task: color, split: support, n: {200 + args.n_train}, seed: 0}}",
        f"data.n_train={args.n_train}",
        "data.n_support=200",
        f"extract.k={args.k}",
    ]
    times: dict[str, list[float]] = {"plain": [], "hooks": [], "extract": []}
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            times["plain"].append(teacher_forwards(base, hooks=False))
            times["hooks"].append(teacher_forwards(base, hooks=True))
            times["extract"].append(
                extract(ROOT / "params.yaml", Path(tmp) / f"run{r}.zarr", base)["seconds"]
            )
        for codec in ("lossless", "int8"):
            sizes[codec] = extract(
                ROOT / "params.yaml", Path(tmp) / f"{codec}.zarr", [*base, f"extract.codec={codec}"]
            )
    print(
        f"embedded model, {args.n_train} samples, k={args.k}, {args.repeats} rounds, torch {torch.__version__}"
    )
    print(f"{'':<7} {'plain s':>8} {'hooks s':>8} {'extract s':>9} {'hooks/plain':>11} {'extract/plain':>13}")
    for name, pick in (("best", min), ("median", statistics.median)):
        p, h, e = (pick(times[k]) for k in ("plain", "hooks", "extract"))
        print(f"{name:<7} {p:>8.2f} {h:>8.2f} {e:>9.2f} {h / p:>11.2f} {e / p:>13.2f}")
    print(f"{'codec':<9} {'bytes/value':>11} {'compression':>11} {'MiB':>7}")
    for codec, st in sizes.items():
        print(
            f"{codec:<9} {st['bytes_per_value']:>11.3f} {st['compression_ratio']:>11.2f} {st['bytes_on_disk'] / 2**20:>7.2f}"
        )


if __name__ == "__main__":
    main()
