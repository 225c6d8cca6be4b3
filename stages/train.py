"""`mimic train`: fit only the MimIC shift heads against the cached teacher states.

Recipe: params -> model -> splits -> check the cache's fingerprint -> shift + AdamW + cosine schedule ->
(resume) -> epochs of student forwards with hooks, CE + alignment loss -> checkpoint each epoch -> save shift.
`--online` is the reference mode: the teacher runs on the same ICD sets at every step instead of the cache.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from pipeline.cache_store import CacheReader
from pipeline.config import load_params
from pipeline.errors import MimicError
from pipeline.fingerprint import teacher_fingerprint
from pipeline.models import Loaded, load_model
from pipeline.prompts import PromptBuilder
from pipeline.samples import kept_positions, student_batch, training_samples
from pipeline.shift import MimicShift, attach, spec_for
from pipeline.shift_io import save_shift
from pipeline.splits import make_splits
from pipeline.teacher import forward_query_states
from pipeline.training import (
    CacheTargets,
    OnlineTargets,
    alignment_loss,
    answer_ce,
    autocast_for,
    epoch_batches,
    load_checkpoint,
    save_checkpoint,
)

log = logging.getLogger(__name__)
LOG_COLUMNS = ("step", "epoch", "loss", "ce", "align", "lr")


def train(
    params_path: Path, cache: Path | None, run_dir: Path, overrides: list[str], loaded: Loaded | None = None
) -> dict:
    """Train (or resume) a run in `run_dir`; `cache=None` runs the online reference teacher instead.
    `loaded` reuses a model already in memory (it must be the one `params` names)."""
    params = load_params(params_path, overrides)
    tr, ex = params.train, params.extract
    if cache is not None:
        CacheReader.open(cache, verify=False)  # exists and complete: fail before loading a large model
    loaded = loaded or load_model(params.model.name, params.model.dtype, params.model.device)
    model, adapter = loaded.model, loaded.adapter
    splits = make_splits(params.data)
    layers = list(range(adapter.geometry.num_layers)) if ex.layers is None else sorted(ex.layers)
    reader = None
    if cache is not None:  # checked before any step: model, tokenizer, data, prompts, k, M, site, layers
        reader = CacheReader.open(cache, expect=teacher_fingerprint(params, loaded, splits, layers))
    samples = training_samples(splits.train, splits.support, ex.k, ex.m, ex.seed)
    builder = PromptBuilder.for_model(loaded, params.prompt)
    shift = MimicShift(spec_for(adapter, tr.variant), torch.Generator().manual_seed(tr.seed)).to(
        params.model.device
    )
    optimizer = torch.optim.AdamW(shift.parameters(), lr=tr.lr, weight_decay=tr.weight_decay)
    steps_per_epoch = math.ceil(math.ceil(len(splits.train) / tr.batch_size) / tr.grad_accum)
    total = steps_per_epoch * tr.epochs
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(tr.warmup * total), total)
    autocast = autocast_for(params.model.device, tr.precision)
    scaler = torch.amp.GradScaler("cuda", enabled=tr.precision == "fp16")

    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = run_dir / "checkpoint.pt"
    rows: list[dict] = []
    start_epoch = 0
    identity = json.dumps(
        {
            "params": [vars(tr), vars(ex), vars(params.model), vars(params.data), params.prompt],
            "cache": str(cache),
        },
        sort_keys=True,
        default=str,
    )
    if (state := load_checkpoint(checkpoint_path)) is not None:
        if state["identity"] != identity:
            raise MimicError(
                f"{checkpoint_path} belongs to a run with other parameters; use another --run-dir or delete it"
            )
        shift.load_state_dict(state["shift"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, rows = state["epoch"], state["log"]
        log.info("resuming %s after epoch %d", run_dir, start_epoch)

    loop_start = time.perf_counter()
    with attach(model, shift):
        for epoch in range(start_epoch, tr.epochs):
            batches = epoch_batches(samples, epoch, tr.batch_size, tr.seed)
            targets = (
                CacheTargets(reader, batches)
                if reader is not None
                else OnlineTargets(model, adapter, builder, samples, shift, batches, ex, layers)
            )
            bar = tqdm(zip(batches, targets), total=len(batches), desc=f"train epoch {epoch + 1}/{tr.epochs}")
            for i, (indices, target) in enumerate(bar):
                batch, lengths = student_batch(builder, samples, indices)
                keep = kept_positions(builder, samples, indices, ex.positions, adapter.image_token_id)
                with autocast():
                    got, logits = forward_query_states(
                        model, adapter, batch, lengths, ex.site, layers, kept=keep
                    )
                    ce = answer_ce(logits, batch)
                    align = alignment_loss(got.states, [t.to(logits.device) for t in target])
                    loss = tr.ce_weight * ce + tr.align_weight * align
                scaler.scale(loss / tr.grad_accum).backward()
                if (i + 1) % tr.grad_accum == 0 or i + 1 == len(batches):
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(shift.parameters(), tr.clip)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                row = {
                    "step": len(rows),
                    "epoch": epoch,
                    "loss": loss.item(),
                    "ce": ce.item(),
                    "align": align.item(),
                    "lr": optimizer.param_groups[0]["lr"],
                }
                rows.append(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", align=f"{row['align']:.4f}")
            save_checkpoint(
                checkpoint_path,
                {
                    "shift": shift.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch + 1,
                    "log": rows,
                    "identity": identity,
                },
            )

    provenance = {
        "params": {"train": vars(tr), "extract": vars(ex)},
        "cache": str(cache) if cache else "online",
    }
    save_shift(shift, run_dir / "shift", adapter, provenance=json.loads(json.dumps(provenance, default=str)))
    write_log(run_dir / "train_log.tsv", rows)
    loop_seconds = time.perf_counter() - loop_start
    last_epoch = [r for r in rows if r["epoch"] == rows[-1]["epoch"]]
    summary = {
        "first_align": rows[0]["align"],  # the first step's alignment loss
        "last_align": sum(r["align"] for r in last_epoch) / len(last_epoch),  # mean over the last epoch
        "last_ce": sum(r["ce"] for r in last_epoch) / len(last_epoch),
        "steps": len(rows),
        "seconds_per_epoch": loop_seconds / max(tr.epochs - start_epoch, 1),  # the training loop only
    }
    (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    return summary


def write_log(path: Path, rows: list[dict]) -> None:
    """Per-step loss components as TSV, which `dvc plots` reads."""
    lines = ["\t".join(LOG_COLUMNS)] + [
        "\t".join(f"{r[c]:.6g}" if isinstance(r[c], float) else str(r[c]) for c in LOG_COLUMNS) for r in rows
    ]
    path.write_text("\n".join(lines) + "\n")
