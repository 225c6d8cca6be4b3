"""Extraction cost against plain teacher forwards, and the size of each cache codec, on the embedded model.

    .venv/bin/python benchmarks/extract.py          # 512 samples, k = 4 and 8, 9 rounds; ~5 minutes on 2 cores

"plain" runs the same batches (prompt assembly included) through the teacher with no hooks and no writes;
"hooks" adds the recording hooks and the gathering of query+answer states, still no writes; "extract" is the
stage's own loop: hooks, gathering, staged Zarr writes in a background thread. All three in
this process, interleaved round by round. Timings on a shared 2-core VM drift by up to +-30% between rounds,
so two ratios are printed: of the best times, and the median over rounds of each round's own ratio (the
three runs of a round are seconds apart, so a slow spell slows all of them).
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
from pipeline.prompts import PromptBuilder
from pipeline.samples import teacher_batch, training_samples
from pipeline.splits import make_splits
from pipeline.teacher import forward_inputs, forward_query_states
from stages.extract import extract

ROOT = Path(__file__).resolve().parents[1]


def teacher_loop(params, loaded, hooks: bool, device):
    """The extract loop's forwards without writes, as a function to time; with `hooks`, states are recorded
    and gathered as the stage records them (also timed by benchmarks/gpu.py, with CUDA synchronisation)."""
    splits = make_splits(params.data)
    ex = params.extract
    samples = training_samples(splits.train, splits.support, ex.k, ex.m, ex.seed)
    builder = PromptBuilder.for_model(loaded, params.prompt)  # as the stage builds it
    for query in splits.train:  # as extract does before its loop: query rounds are counted up front
        builder.tokens(query)
    layers = list(range(loaded.view.geometry.num_layers))

    def loop() -> None:
        with torch.no_grad():
            for first in range(0, len(samples), ex.batch_size):
                batch, lengths = teacher_batch(
                    builder, samples, range(first, min(first + ex.batch_size, len(samples)))
                )
                if hooks:
                    forward_query_states(
                        loaded.model, loaded.view, batch, lengths, ex.site, layers, ex.topk, all_logits=False,
                        last_token=ex.last_token,  # the last-prompt-token signals too, as the stage records them
                    )  # fmt: skip
                else:
                    loaded.model(**forward_inputs(loaded.view, batch, device))

    return loop


def teacher_forwards(overrides: list[str], hooks: bool) -> float:
    """Seconds for the extract loop's forwards without writes; with `hooks`, states are recorded and gathered."""
    params = load_params(ROOT / "params.yaml", overrides)
    loaded = load_model(params.model.name, params.model.dtype, params.model.device)
    loop = teacher_loop(params, loaded, hooks, params.model.device)
    start = time.perf_counter()
    loop()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=512)
    parser.add_argument("--k", type=int, nargs="+", default=[4, 8], help="shots; 4 is params.yaml's default")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    logging.disable(logging.INFO)
    torch.set_num_threads(2)
    base = [
        f"data.train={{kind: embedded, task: color, split: support, n: {200 + args.n_train}, seed: 0}}",
        f"data.n_train={args.n_train}",
        "data.n_support=200",
        "data.n_val=0",  # no validation queries: only tv and fv use them
    ]
    rows, sizes = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for run, k in enumerate(args.k):
            shots = [*base, f"extract.k={k}"]
            times: dict[str, list[float]] = {"plain": [], "hooks": [], "extract": []}
            for r in range(args.repeats):
                times["plain"].append(teacher_forwards(shots, hooks=False))
                times["hooks"].append(teacher_forwards(shots, hooks=True))
                out = Path(tmp) / f"{run}-k{k}-{r}.zarr"
                times["extract"].append(extract(ROOT / "params.yaml", out, shots)["seconds"])
            best = [min(times[key]) for key in ("plain", "hooks", "extract")]
            paired = [
                statistics.median(a / b for a, b in zip(times[key], times["plain"], strict=True))
                for key in ("hooks", "extract")
            ]
            rows.append((k, *best, best[1] / best[0], paired[0], best[2] / best[0], paired[1]))
        for codec in ("lossless", "int8"):
            shots = [*base, f"extract.k={args.k[0]}", f"extract.codec={codec}"]
            sizes[codec] = extract(ROOT / "params.yaml", Path(tmp) / f"{codec}.zarr", shots)
    print(f"embedded model, {args.n_train} samples, {args.repeats} rounds, torch {torch.__version__}")
    print("| k | plain s | hooks s | extract s | hooks/plain (best, paired) | extract/plain (best, paired) |")
    print("|---|---|---|---|---|---|")
    for k, p, h, e, hb, hm, eb, em in rows:
        print(f"| {k} | {p:.2f} | {h:.2f} | {e:.2f} | {hb:.2f}, {hm:.2f} | {eb:.2f}, {em:.2f} |")
    print("| codec | bytes/value | compression | MiB |")
    print("|---|---|---|---|")
    for codec, st in sizes.items():
        mib = st["bytes_on_disk"] / 2**20
        print(f"| {codec} | {st['bytes_per_value']:.3f} | {st['compression_ratio']:.2f} | {mib:.2f} |")


if __name__ == "__main__":
    main()
