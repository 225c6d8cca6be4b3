"""Inference cost per method on the embedded model: MimIC (no demonstrations) vs zero-shot vs k-shot ICL.

    .venv/bin/python benchmarks/evaluate.py         # trains a small shift first; a few minutes on 2 cores

Runs `mimic evaluate`'s own code several times and reports the median latency ratios measured in each run.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
from pathlib import Path

import torch

from stages.evaluate import evaluate
from stages.extract import extract
from stages.train import train

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-eval", type=int, default=128)
    args = parser.parse_args()
    logging.disable(logging.INFO)
    torch.set_num_threads(2)
    base = [
        "data.n_train=64",
        "train.epochs=1",
        f"data.n_eval={args.n_eval}",
        "evaluate.methods=[zero_shot, icl]",
    ]
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        extract(ROOT / "params.yaml", tmp / "cache.zarr", base)
        train(ROOT / "params.yaml", tmp / "cache.zarr", tmp / "mimic", base)
        for r in range(args.repeats):
            reports.append(
                evaluate(ROOT / "params.yaml", [tmp / "mimic"], tmp / f"m{r}.json", tmp / f"p{r}.jsonl", base)
            )
    lat = {
        m: statistics.median(r["latency"][m]["ms_per_sample"] for r in reports)
        for m in ("zero_shot", "icl", "mimic")
    }
    mimic_vs_zero = statistics.median(
        r["latency"]["mimic"]["ms_per_sample"] / r["latency"]["zero_shot"]["ms_per_sample"] for r in reports
    )
    icl_vs_mimic = statistics.median(
        r["latency"]["icl"]["ms_per_sample"] / r["latency"]["mimic"]["ms_per_sample"] for r in reports
    )
    tokens = {m: reports[0]["latency"][m]["prompt_tokens_per_sample"] for m in lat}
    print(f"embedded model, {args.n_eval} queries, median of {args.repeats} runs, torch {torch.__version__}")
    print(f"{'method':<10} {'ms/sample':>10} {'prompt tokens':>14}")
    for m in lat:
        print(f"{m:<10} {lat[m]:>10.2f} {tokens[m]:>14.1f}")
    print(f"MimIC / zero-shot latency: {mimic_vs_zero:.3f}x; ICL / MimIC latency: {icl_vs_mimic:.2f}x")


if __name__ == "__main__":
    main()
