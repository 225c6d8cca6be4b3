"""`mimic extract`, `train` and `evaluate` in 1 process vs 2 under `torchrun` (gloo on CPU): wall time of each.

    .venv/bin/python benchmarks/distributed.py        # ~2 minutes on 2 cores

The embedded default, 200 training queries (one teacher cache for all runs), 200 evaluation queries. One
process uses both cores (2 torch threads); two processes use one thread each. Each command runs as its own
process (start-up included, as a user waits for it); the two modes alternate over the rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def seconds(command: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    mimic = [str(BIN / "mimic")]
    torchrun = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python", *mimic]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run(
            [*mimic, "extract", "--out", str(tmp / "c.zarr")], cwd=ROOT, check=True, capture_output=True
        )
        subprocess.run([*mimic, "train", "--cache", str(tmp / "c.zarr"), "--run-dir", str(tmp / "shift0")],
                       cwd=ROOT, check=True, capture_output=True)  # fmt: skip
        stages = {
            "extract": lambda run: ["extract", "--out", str(tmp / run / "c.zarr")],
            "train": lambda run: ["train", "--cache", str(tmp / "c.zarr"), "--run-dir", str(tmp / run)],
            "evaluate": lambda run: ["evaluate", "--run-dir", str(tmp / "shift0"), "--metrics",
                                     str(tmp / run / "m.json"), "--predictions", str(tmp / run / "p.jsonl")],
        }  # fmt: skip
        times = {(stage, n): [] for stage in stages for n in (1, 2)}
        for r in range(args.rounds):
            for stage, build in stages.items():
                for n in (1, 2) if r % 2 == 0 else (2, 1):
                    launcher, threads = (mimic, 2) if n == 1 else (torchrun, 1)
                    times[stage, n].append(seconds([*launcher, *build(f"{stage}{n}-{r}")], threads))
    print("embedded default, 200 training / 200 evaluation queries, wall seconds (median of rounds)")
    print("(evaluate scores every method of evaluate.methods plus one trained run)")
    print(f"{'stage':<9} {'1 process':>10} {'2 processes':>12} {'speed-up':>9}")
    for stage in stages:
        one, two = statistics.median(times[stage, 1]), statistics.median(times[stage, 2])
        print(f"{stage:<9} {one:>10.1f} {two:>12.1f} {one / two:>8.2f}x")


if __name__ == "__main__":
    main()
