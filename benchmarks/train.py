"""Training from the teacher cache vs the online reference (the teacher re-run at every step), on the embedded model.

    .venv/bin/python benchmarks/train.py            # k = 8 and 32, 64 training queries, a 5-run lr sweep

For each k: one extraction, then a 5-run learning-rate sweep (2 epochs each) both ways, all in this process.
Reports seconds per epoch (the training loop alone, best of the runs) from the cache and online, their
ratio, and the sweep's total wall time both ways (cache: one extraction + 5 whole `train` calls; online: 5
whole `train` calls that each run the teacher; model loading and prompt building included in both).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from stages.extract import extract
from stages.train import train

ROOT = Path(__file__).resolve().parents[1]
LRS = (0.003, 0.01, 0.03, 0.1, 0.3)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--runs", type=int, default=len(LRS))
    args = parser.parse_args()
    logging.disable(logging.INFO)
    torch.set_num_threads(2)
    rows = []
    for k in args.ks:
        base = [
            f"extract.k={k}",
            f"evaluate.k={k}",
            f"data.n_train={args.n_train}",
            "data.n_support=200",
            "data.n_val=0",  # no validation queries: only tv and fv use them
            f"data.train={{kind: embedded, task: color, split: support, n: {200 + args.n_train}, seed: 0}}",
            "train.epochs=2",
            "extract.batch_size=8",
        ]
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            extract_s = timed(extract, ROOT / "params.yaml", tmp / "cache.zarr", base)
            cache_runs, online_runs, cache_epoch, online_epoch = [], [], [], []
            for lr in LRS[: args.runs]:
                run = base + [f"methods.mimic.lr={lr}"]
                start = time.perf_counter()
                cache_epoch.append(
                    train(ROOT / "params.yaml", tmp / "cache.zarr", tmp / f"c{lr}", run)["seconds_per_epoch"]
                )
                cache_runs.append(time.perf_counter() - start)
                start = time.perf_counter()
                online_epoch.append(
                    train(ROOT / "params.yaml", None, tmp / f"o{lr}", run)["seconds_per_epoch"]
                )
                online_runs.append(time.perf_counter() - start)
        rows.append((k, extract_s, cache_runs, online_runs, min(cache_epoch), min(online_epoch)))
    print(
        f"embedded model, {args.n_train} training queries, 2 epochs per run, {args.runs} runs, torch {torch.__version__}"
    )
    print(
        f"{'k':>3} {'extract s':>9} {'cache s/epoch':>13} {'online s/epoch':>14} {'speedup':>7}"
        f" {'sweep cache s':>13} {'sweep online s':>14} {'sweep speedup':>13}"
    )
    for k, extract_s, cache_runs, online_runs, cache_epoch, online_epoch in rows:
        sweep_cache = extract_s + sum(cache_runs)
        sweep_online = sum(online_runs)
        print(
            f"{k:>3} {extract_s:>9.1f} {cache_epoch:>13.2f} {online_epoch:>14.2f} {online_epoch / cache_epoch:>7.2f}"
            f" {sweep_cache:>13.1f} {sweep_online:>14.1f} {sweep_online / sweep_cache:>13.2f}"
        )


if __name__ == "__main__":
    main()
