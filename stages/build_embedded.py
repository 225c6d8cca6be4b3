"""Regenerate the embedded model: pretrain the tiny LLaVA for in-context learning, evaluate, save.

    .venv/bin/python -m stages.build_embedded --out pipeline/embedded/assets --seed 0

Reads nothing (or, with `--init DIR`, a model that already went through phases 1 and 2 with the same seed:
those phases then only replay their random draws); writes the model (safetensors, config, generation config)
and the processor files into `--out` with `save_pretrained`, then prints the wall time, each attribute task's
zero-shot / k-shot accuracy and each noisy task's accuracy at 0 to 16 shots.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import typer
from transformers import AutoModelForImageTextToText

from pipeline.embedded.accuracy import few_shot_accuracy
from pipeline.embedded.model import build_model, build_processor
from pipeline.embedded.pretrain import PretrainConfig, pretrain
from pipeline.embedded.tasks import ATTRIBUTES, NOISY_SUFFIX

NOISY_SHOTS = (0, 1, 2, 4, 8, 16)

logger = logging.getLogger(__name__)

app = typer.Typer(help="Pretrain and save the embedded tiny LLaVA.", add_completion=False)


@app.command()
def build(
    out: Path = typer.Option(..., help="Directory to write the model and processor into."),
    seed: int = typer.Option(0, help="Seed of the initial weights, the scene pool and the batches."),
    threads: int = typer.Option(2, help="torch CPU threads."),
    shots: int = typer.Option(4, help="Demonstrations per query in the k-shot evaluation."),
    n_queries: int = typer.Option(200, help="Held-out queries per task in the evaluation."),
    eval_seed: int = typer.Option(0, help="Seed of the evaluation queries and demonstrations."),
    init: Path | None = typer.Option(
        None,
        help="A model after phases 1 and 2 of the same seed (e.g. the previous assets): train phase 3 only.",
    ),
) -> None:
    """Pretrain with the default curriculum, save to OUT, print time and per-task accuracy."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(threads)
    start = time.perf_counter()
    processor = build_processor()
    if init is None:
        model = pretrain(build_model(seed), processor, PretrainConfig(), seed)
    else:
        start_model = AutoModelForImageTextToText.from_pretrained(init)
        model = pretrain(start_model, processor, PretrainConfig(), seed, skip=("explicit", "icl"))
    train_seconds = time.perf_counter() - start

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    logger.info("saved model and processor to %s", out)

    rows = []
    for task in ATTRIBUTES:
        zero = few_shot_accuracy(model, processor, task, 0, n_queries, eval_seed)
        few = few_shot_accuracy(model, processor, task, shots, n_queries, eval_seed)
        rows.append((task, zero, few))
    total_seconds = time.perf_counter() - start

    n_params = sum(p.numel() for p in model.parameters())
    size_mb = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e6
    print(f"parameters: {n_params:,}; weights: {size_mb:.2f} MB in {out}")
    print(f"wall time: pretrain {train_seconds:.0f} s, total {total_seconds:.0f} s ({threads} threads)")
    print(f"accuracy on {n_queries} held-out queries per task (eval seed {eval_seed}):")
    print(f"| task | 0-shot | {shots}-shot | gain |")
    print("| --- | --- | --- | --- |")
    for task, zero, few in rows:
        print(f"| {task} | {zero:.3f} | {few:.3f} | {few - zero:+.3f} |")
    mean_zero = sum(r[1] for r in rows) / len(rows)
    mean_few = sum(r[2] for r in rows) / len(rows)
    print(f"| mean | {mean_zero:.3f} | {mean_few:.3f} | {mean_few - mean_zero:+.3f} |")
    print("| noisy task | " + " | ".join(f"{k}-shot" for k in NOISY_SHOTS) + " |")
    print("| --- |" + " --- |" * len(NOISY_SHOTS))
    for task in ATTRIBUTES:
        curve = [
            few_shot_accuracy(model, processor, task + NOISY_SUFFIX, k, n_queries, eval_seed)
            for k in NOISY_SHOTS
        ]
        print(f"| {task}{NOISY_SUFFIX} | " + " | ".join(f"{a:.3f}" for a in curve) + " |")


if __name__ == "__main__":
    app()
