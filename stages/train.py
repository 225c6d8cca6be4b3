"""`mimic train`: fit one method (`train.method`: MimIC, its ablations, LIVE, HiFICL, LoRA ...) from the cached teacher.

Recipe: params -> model -> splits -> check the cache's fingerprint -> method + AdamW + cosine schedule ->
(resume) -> epochs of student forwards, the method's weighted CE / alignment / KL -> checkpoint each epoch ->
save the method (pipeline.methods.io).
`--online` is the reference mode: the teacher runs on the same ICD sets at every step instead of the cache.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.cache.store import CacheReader
from pipeline.config import load_params
from pipeline.distributed import rank_device, share, world
from pipeline.errors import MimicError
from pipeline.fingerprint import content_hash, teacher_fingerprint
from pipeline.methods import build_method, method_configs
from pipeline.methods.io import save_method
from pipeline.methods.vectors import FitData
from pipeline.models import Loaded, check_model, load_model, weights_fingerprint
from pipeline.outputs import check_writable, write_text_atomic
from pipeline.plots import layer_curve, training_curves
from pipeline.prefetch import ahead
from pipeline.prompts import PromptBuilder
from pipeline.rices import check_encoder
from pipeline.samples import batch_counts, teacher_samples
from pipeline.sources import sources_hash
from pipeline.splits import make_splits
from pipeline.trainer import Trainer
from pipeline.training import (
    CacheTargets,
    OnlineTargets,
    Weights,
    batch_loss,
    epoch_batches,
    load_checkpoint,
    save_checkpoint,
    student_inputs,
)

log = logging.getLogger(__name__)
LOG_COLUMNS = ("step", "epoch", "loss", "ce", "align", "kl", "lr")


def train(
    params_path: Path,
    cache: Path | None,
    run_dir: Path,
    overrides: list[str],
    loaded: Loaded | None = None,
    replace: bool = False,
) -> dict:
    """Train (or resume) `train.method` in `run_dir`; `cache=None` runs the online reference teacher instead.
    A checkpoint of the same run (method and its parameters, teacher cache, training code) is resumed; a finished
    one only rewrites the outputs, with the figures it measured. With `replace`, a checkpoint of another run is
    discarded instead of refused (DVC keeps the checkpoint across reruns). `loaded` reuses a model in memory."""
    params = load_params(params_path, overrides)
    tr, ex = params.train, params.extract
    config = method_configs(params.methods)[tr.method]
    check_model(params.model.name, params.model.dtype, params.model.device, ex.layers)
    here = world()  # under torchrun: each rank trains on its share of every batch
    device = rank_device(params.model.device, here)
    if cache is None and (config.kl_weight > 0 or tr.method in ("lora", "mimic_lora", "tv", "fv")):
        raise MimicError(f"--online serves MimIC-style alignment only; {tr.method} trains from the cache")
    if tr.method in ("tv", "fv") and params.data.n_val == 0:
        raise MimicError(f"{tr.method} chooses its layer on validation queries: set data.n_val > 0")
    # after the checks above: a refused run leaves no empty run directory
    check_writable(run_dir / "method", "run directory", folder=True)
    if cache is not None:
        CacheReader.open(cache, verify=False)  # exists and complete: fail before loading a large model
    splits = make_splits(params.data)  # data errors before the model is read
    if params.extract.icd == "rices":
        check_encoder(params.data.rices_encoder)
    loaded = loaded or load_model(params.model.name, params.model.dtype, device)
    model, view = loaded.model, loaded.view
    layers = list(range(view.geometry.num_layers)) if ex.layers is None else sorted(ex.layers)
    teacher = teacher_fingerprint(params, loaded, splits, layers)  # model, data content, prompt, extract
    reader = None
    if cache is not None:  # checked before any step: model, tokenizer, data, prompts, k, M, site, layers
        reader = CacheReader.open(cache, expect=teacher)
        if config.kl_weight > 0 and not reader.layout.topk:
            raise MimicError(
                f"{tr.method} needs the teacher's logits: extract with extract.topk > 0 ({cache})"
            )
    samples = teacher_samples(splits, ex, loaded, params.data.rices_encoder, loaded.device)
    builder = PromptBuilder.for_model(loaded, params.prompt)
    method = build_method(tr.method, config, view, torch.Generator().manual_seed(tr.seed)).to(loaded.device)
    if method.fitted:  # tv, fv: one pass over the cache, choices on the validation queries
        if here.size > 1:
            raise MimicError(f"{tr.method} is fitted in one pass by one process: run it without torchrun")
        data = FitData(model, view, builder, reader, splits.support, splits.val, ex.k, tr.batch_size)
        return fit_method(method, data, run_dir, params, cache, teacher, replace)
    base_weights = weights_fingerprint(model)  # before LoRA enters the model
    handle = method.attach(model)  # LoRA's tensors exist once attached
    batches_per_epoch = math.ceil(len(splits.train) / tr.batch_size)
    trainer = Trainer(method, config.lr, config.weight_decay, tr, params.model.device, batches_per_epoch)

    checkpoint_path = run_dir / "checkpoint.pt"
    # What the method's values depend on (not where data lives, the evaluation set or the device): a checkpoint
    # of the same identity is resumed, any other is not
    identity = {
        "train": vars(tr),
        "method": config.to_dict(),
        "teacher": teacher,
        "online": cache is None,
        "code": sources_hash("stages.train"),  # comments and docstrings aside
    }
    rows, epoch_seconds, start_epoch = [], [], 0
    identity = json.loads(json.dumps(identity, sort_keys=True, default=str))
    if (state := checkpoint_of(checkpoint_path, identity, replace)) is not None:
        method.load_checkpoint_state(state["method"])
        trainer.load_state_dict(state)
        start_epoch, rows, epoch_seconds = state["epoch"], state["log"], state["epoch_seconds"]
        log.info("resuming %s after epoch %d of %d", run_dir, start_epoch, tr.epochs)

    run_dir.mkdir(parents=True, exist_ok=True)
    weights = Weights(config.ce_weight, config.align_weight, config.kl_weight)

    def counts(indices):  # a whole batch's answer tokens and aligned positions: its losses' denominators
        return batch_counts(builder, samples, indices, ex.positions, view.image_token_id)

    def loss(part, target_and_inputs, whole):
        target, inputs = target_and_inputs
        return batch_loss(model, view, inputs, target, whole, ex, layers, weights)

    bar = tqdm(total=batches_per_epoch * tr.epochs, initial=batches_per_epoch * start_epoch, desc=tr.method)

    def progress(row):
        bar.set_postfix(epoch=f"{row['epoch'] + 1}/{tr.epochs}", loss=f"{row['loss']:.4f}")
        bar.update()

    with handle, bar:
        method.train_mode(True)
        for epoch in range(start_epoch, tr.epochs):
            epoch_start = time.perf_counter()
            batches = epoch_batches(samples, epoch, tr.batch_size, tr.seed)
            parts = [[b[n] for n in share(len(b), here)] for b in batches]  # this rank's rows of each batch
            inputs = ahead(  # the student batches, built params.data.workers batches ahead
                lambda i, parts=parts: (
                    student_inputs(builder, samples, parts[i], ex, view) if parts[i] else None
                ),
                len(parts),
                params.data.workers,
            )
            targets = (
                CacheTargets(reader, parts)
                if reader is not None
                else OnlineTargets(model, view, builder, samples, method, parts, ex, layers)
            )
            with contextlib.closing(inputs):  # an error stops the building threads too
                trainer.epoch(epoch, batches, parts, zip(targets, inputs), counts, loss, here, rows, progress)
            epoch_seconds.append(time.perf_counter() - epoch_start)
            if here.main:  # one checkpoint, written by one rank; every rank holds the same weights
                saved = {"method": method.checkpoint_state(), **trainer.state_dict(), "epoch": epoch + 1}
                saved.update(log=rows, epoch_seconds=epoch_seconds, identity=identity)
                save_checkpoint(checkpoint_path, saved)
        method.train_mode(False)
        provenance = {
            "params": {"train": vars(tr), "method": config.to_dict(), "extract": vars(ex)},
            "cache": str(cache) if cache else "online",
        }
        provenance = json.loads(json.dumps(provenance, default=str))
        summary = training_summary(rows, epoch_seconds)
        summary["parameters"] = method.num_parameters()
        if here.main:  # while attached: LoRA's tensors are read from the model
            save_method(method, run_dir / "method", view, provenance, params.prompt, base_weights)
    if not here.main:
        return summary
    if config.align_weight > 0 and summary["last_align"] > summary["first_align"]:
        log.warning(
            "the alignment loss rose over training (%.4g in the first epoch, %.4g in the last): lower the lr",
            summary["first_align"],
            summary["last_align"],
        )
    write_log(run_dir / "train_log.tsv", rows)
    training_curves(rows, run_dir / "train_curves.png", title=f"{run_dir.name}: loss per step")
    # DVC metrics: the losses a comparison needs (few keys: `dvc exp show` stays narrow); the rest beside it
    metrics = {"align": summary["last_align"], "ce": summary["last_ce"], "kl": summary["last_kl"]}
    write_text_atomic(run_dir / "train_info.json", json.dumps(summary, indent=2, sort_keys=True))
    write_text_atomic(run_dir / "train_summary.json", json.dumps(metrics, indent=2, sort_keys=True))
    return summary


def checkpoint_of(path: Path, identity: dict, replace: bool) -> dict | None:
    """The checkpoint at `path` if it belongs to this run; one of another run is refused (or, with `replace`,
    discarded) naming what differs; an unreadable one likewise."""
    try:
        state = load_checkpoint(path)
    except MimicError:
        if not replace:
            raise
        log.info("discarding %s: it cannot be read", path)
        return None
    if state is None or state.get("identity") == identity:
        return state
    old = state.get("identity") if isinstance(state.get("identity"), dict) else {}
    differs = [k for k in identity if old.get(k) != identity[k]] or ["format"]
    if not replace:
        raise MimicError(
            f"{path} belongs to another run (its {', '.join(differs)} differ); use another --run-dir, delete it, "
            "or pass --replace"
        )
    log.info("discarding %s: it belongs to another run (%s differ)", path, ", ".join(differs))
    return None


def fit_method(
    method, data: FitData, run_dir: Path, params, cache: Path, teacher: dict, replace: bool
) -> dict:
    """A method fitted in one pass (tv, fv): fit, save, and write the outputs a training run writes. A run of
    the same identity already fitted only rewrites its outputs."""
    identity = {"train": vars(params.train), "method": method.config.to_dict(), "teacher": teacher}
    identity["validation"] = content_hash(data.validation)  # the queries the layer and heads are chosen on
    identity = json.loads(
        json.dumps({**identity, "code": sources_hash("stages.train")}, sort_keys=True, default=str)
    )
    checkpoint_path = run_dir / "checkpoint.pt"
    state = checkpoint_of(checkpoint_path, identity, replace)
    start = time.perf_counter()
    if state is not None:
        method.load_checkpoint_state(state["method"])
        method.layer, method.report, seconds = state["layer"], state["report"], state["seconds"]
    else:
        if not data.reader.layout.last_layers:
            raise MimicError(
                f"{method.name} reads the last-token signals: extract with extract.last_token: true"
            )
        method.fit(data)
        seconds = time.perf_counter() - start
        run_dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint(
            checkpoint_path,
            {"method": method.checkpoint_state(), "layer": method.layer, "report": method.report,
             "seconds": seconds, "identity": identity},
        )  # fmt: skip
    report = method.report
    provenance = json.loads(json.dumps({"params": identity["train"], "cache": str(cache)}, default=str))
    save_method(method, run_dir / "method", data.view, provenance, params.prompt)
    rows = [{"layer": int(k), "validation_ce": v} for k, v in report["validation_ce"].items()]
    lines = ["layer\tvalidation_ce"] + [f"{r['layer']}\t{r['validation_ce']:.6g}" for r in rows]
    write_text_atomic(run_dir / "train_log.tsv", "\n".join(lines) + "\n")
    layer_curve(
        rows, run_dir / "train_curves.png", f"{run_dir.name}: validation CE per layer (chosen {method.layer})"
    )
    summary = {**report, "parameters": method.num_parameters(), "seconds": round(seconds, 3), "steps": 0}
    best = min(r["validation_ce"] for r in rows)
    write_text_atomic(run_dir / "train_info.json", json.dumps(summary, indent=2, sort_keys=True))
    write_text_atomic(
        run_dir / "train_summary.json", json.dumps({"validation_ce": best}, indent=2, sort_keys=True)
    )
    worst = max(r["validation_ce"] for r in rows)
    return {**summary, "first_loss": worst, "last_loss": best, "fitted": True, "layer": method.layer}


def training_summary(rows: list[dict], epoch_seconds: list[float]) -> dict:
    """First and last epoch's mean losses (compared on equal terms) and the measured seconds per epoch."""

    def mean(key: str, epoch: int) -> float:
        values = [r[key] for r in rows if r["epoch"] == epoch]
        return sum(values) / len(values)

    first, last = rows[0]["epoch"], rows[-1]["epoch"]
    return {
        "first_loss": mean("loss", first),
        "last_loss": mean("loss", last),
        "first_align": mean("align", first),  # mean over the first epoch
        "last_align": mean("align", last),  # mean over the last epoch
        "first_ce": mean("ce", first),
        "last_ce": mean("ce", last),
        "first_kl": mean("kl", first),
        "last_kl": mean("kl", last),
        "steps": len(rows),
        "seconds_per_epoch": sum(epoch_seconds) / len(epoch_seconds),  # the training loop, as measured
    }


def write_log(path: Path, rows: list[dict]) -> None:
    """Per-step loss components as TSV, which `dvc plots` reads."""
    lines = ["\t".join(LOG_COLUMNS)] + [
        "\t".join(f"{r[c]:.6g}" if isinstance(r[c], float) else str(r[c]) for c in LOG_COLUMNS) for r in rows
    ]
    write_text_atomic(path, "\n".join(lines) + "\n")
