"""`mimic extract`: run the k-shot teacher once and cache its per-layer query+answer states in a Zarr store.

Recipe: params -> model -> splits -> ICD sets -> prompts -> (resume) -> batched teacher forwards with hooks ->
staged writes in a background thread -> mark complete -> report size and compression.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from pathlib import Path

import torch
import zarr
from tqdm import tqdm

from pipeline.cache.background import AsyncWriter
from pipeline.cache.store import Layout, store_stats
from pipeline.cache.writer import CacheWriter, Part
from pipeline.config import load_params
from pipeline.distributed import barrier, gather, rank_device, share, world
from pipeline.fingerprint import teacher_fingerprint
from pipeline.models import check_model, load_model
from pipeline.outputs import check_writable
from pipeline.prefetch import ahead
from pipeline.prompts import PromptBuilder
from pipeline.rices import check_encoder
from pipeline.samples import kept_positions, teacher_batch, teacher_samples
from pipeline.splits import make_splits
from pipeline.teacher import forward_query_states

log = logging.getLogger(__name__)


def extract(params_path: Path, out: Path, overrides: list[str], replace: bool = False) -> dict:
    """Write (or finish) the teacher cache at `out`; returns the store statistics. With `replace`, a store
    written for other parameters is deleted first (DVC owns `out` and reruns this stage when they change)."""
    params = load_params(params_path, overrides)
    ex = params.extract
    check_model(params.model.name, params.model.dtype, params.model.device, ex.layers)
    here = world()  # under torchrun: each rank computes and writes its part of the one store
    check_writable(out, "teacher store", folder=True)
    splits = make_splits(params.data)  # data errors before the model is read
    if ex.icd == "rices":
        check_encoder(params.data.rices_encoder)
    loaded = load_model(params.model.name, params.model.dtype, rank_device(params.model.device, here))
    samples = teacher_samples(splits, ex, loaded, params.data.rices_encoder, loaded.device)
    geo = loaded.view.geometry
    layers = list(range(geo.num_layers)) if ex.layers is None else sorted(ex.layers)
    builder = PromptBuilder.for_model(loaded, params.prompt)
    image_token = loaded.view.image_token_id
    every = range(len(splits.train))  # sample i of ICD set 0 is query i
    # token counts (images are not kept), the queries encoded params.data.workers at a time
    rounds = list(ahead(lambda i: builder.tokens(splits.train[i]), len(splits.train), params.data.workers))
    kept = kept_positions(builder, samples, every, ex.positions, image_token)
    kept_counts = [len(r.input_ids) for r in rounds] if kept is None else [int(k.sum()) for k in kept]
    token_counts = kept_counts * ex.m
    answer_counts = [int(r.answer_mask.sum()) for r in rounds] * ex.m
    layout = Layout(
        num_layers=len(layers),
        hidden_size=geo.hidden_size,
        dtype=params.model.dtype,
        codec=ex.codec,
        topk=ex.topk,
        chunk_tokens=ex.chunk_tokens,
        last_layers=geo.num_layers if ex.last_token else 0,
        head_width=geo.num_heads * geo.head_dim if ex.last_token else 0,
    )
    value_bytes = 1 if ex.codec == "int8" else torch.empty(0, dtype=loaded.model.dtype).element_size()
    check_writable(
        out, "teacher store", True, sum(token_counts) * len(layers) * geo.hidden_size * value_bytes
    )
    fingerprint = teacher_fingerprint(params, loaded, splits, layers)
    counts = (fingerprint, layout, token_counts, answer_counts)
    if here.size > 1:
        part, todo, lock = prepare_part(out, counts, replace, ex.batch_size, here)
        writer = CacheWriter.open(out, *counts, part=part, lock=lock)
    else:
        if replace and written_for_other_run(out, fingerprint, layout):
            log.info("replacing %s: it was written with other parameters", out)
            shutil.rmtree(out)
        writer = CacheWriter.open(out, *counts)
        todo = writer.missing()
    if not todo and (here.size == 1 or writer.complete):
        log.info("%s is complete for these parameters: nothing to do", out)
        return store_stats(out)
    log.info("extracting %d of %d samples (k=%d, M=%d) into %s", len(todo), len(samples), ex.k, ex.m, out)
    start = time.perf_counter()
    chunks = [todo[first : first + ex.batch_size] for first in range(0, len(todo), ex.batch_size)]

    def prepare(c: int):  # a batch's prompts, built params.data.workers batches ahead
        chunk = chunks[c]
        batch, lengths = teacher_batch(builder, samples, chunk)
        return chunk, batch, lengths, kept_positions(builder, samples, chunk, ex.positions, image_token)

    inputs = ahead(prepare, len(chunks), params.data.workers)
    with (
        contextlib.closing(inputs),  # an error stops the building threads too
        AsyncWriter(writer) as writes,
        torch.no_grad(),
        tqdm(total=len(todo), desc="extract", unit="sample") as bar,
    ):
        for chunk, batch, lengths, keep in inputs:
            got, _ = forward_query_states(
                loaded.model,
                loaded.view,
                batch,
                lengths,
                ex.site,
                layers,
                ex.topk,
                False,
                keep,
                ex.last_token,
            )
            writes.submit_many(
                [
                    (
                        j,
                        got.states[row],
                        got.topk_values[row] if got.topk_values else None,
                        got.topk_indices[row] if got.topk_indices else None,
                        *((got.last_hidden[row], got.last_heads[row]) if ex.last_token else ()),
                    )
                    for row, j in enumerate(chunk)
                ]
            )
            bar.update(len(chunk))
    if here.size > 1:  # the files shared between parts, one rank after the other; rank 0 completes the store
        for rank in range(here.size):
            barrier(here)
            if rank == here.rank:
                writer.write_held()
        writer.close()
        barrier(here)
        if here.main:
            CacheWriter.finish_parts(out)
        barrier(here)
    else:
        writer.finish()
    stats = store_stats(out)
    stats["seconds"] = round(time.perf_counter() - start, 2)
    return stats


def prepare_part(
    out: Path, counts: tuple, replace: bool, batch_size: int, here
) -> tuple[Part, list[int], int | None]:
    """Rank 0 creates (or replaces) the store and lists the missing samples; every rank then takes a contiguous
    run of whole teacher batches of them, so each batch is the one a single process would run. Rank 0 also gets
    the store's lock (held shared from its creation on), the other ranks None."""
    missing = lock = None
    if here.main:
        fingerprint, layout = counts[0], counts[1]
        if replace and written_for_other_run(out, fingerprint, layout):
            log.info("replacing %s: it was written with other parameters", out)
            shutil.rmtree(out)
        missing, lock = CacheWriter.prepare_parts(out, *counts, size=here.size)
    missing = gather(missing, here)[0]  # rank 0's list on every rank, after the store exists
    batches = [missing[i : i + batch_size] for i in range(0, len(missing), batch_size)]
    mine = [j for b in share(len(batches), here) for j in batches[b]]
    part = Part(here.rank, here.size, mine[0], mine[-1] + 1) if mine else Part(here.rank, here.size, 0, 0)
    return part, mine, lock


def written_for_other_run(out: Path, fingerprint: dict, layout: Layout) -> bool:
    """True when `out` holds a store whose fingerprint or layout differs from this run's."""
    if not (out / "zarr.json").is_file():
        return False
    attrs = zarr.open_group(out, mode="r").attrs
    same = (
        attrs.get("fingerprint") == json.loads(json.dumps(fingerprint))
        and attrs.get("layout") == layout.to_dict()
    )
    return not same
