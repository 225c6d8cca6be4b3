"""`extract.positions: text`: the store keeps only the query's text and answer positions, and training aligns
exactly those (image tokens are most of a real query's positions)."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT, SMALL

from pipeline.cache.store import CacheReader, store_stats
from pipeline.config import load_params
from pipeline.methods.mimic import MimicShift, attach, spec_for
from pipeline.models import load_model
from pipeline.prompts import PromptBuilder
from pipeline.samples import student_batch, training_samples
from pipeline.splits import make_splits
from pipeline.teacher import forward_query_states
from pipeline.training import epoch_batches
from stages.extract import extract
from stages.train import train

PARAMS = ROOT / "params.yaml"
TEXT = [*SMALL, "extract.positions=text"]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("positions")
    extract(PARAMS, root / "all.zarr", SMALL)
    extract(PARAMS, root / "text.zarr", TEXT)
    return CacheReader.open(root / "all.zarr"), CacheReader.open(root / "text.zarr")


@pytest.fixture(scope="module")
def setup():
    params = load_params(PARAMS, TEXT)
    loaded = load_model(params.model.name)
    splits = make_splits(params.data)
    ex = params.extract
    samples = training_samples(splits.train, splits.support, ex.k, ex.m, ex.seed)
    return params, loaded, samples, PromptBuilder.for_model(loaded, params.prompt)


def test_text_store_holds_exactly_the_non_image_positions(stores, setup):
    _, loaded, samples, builder = setup
    every, text = stores
    image_token = loaded.view.image_token_id
    assert text.fingerprint["positions"] == "text" and every.fingerprint["positions"] == "all"
    dropped = 0
    for j in range(len(samples)):
        ids = builder.tokens(samples.demos(j)[0]).input_ids  # the query+answer tokens
        keep = ids != image_token
        full, kept = every.read(j)[0], text.read(j)[0]
        assert kept.shape[1] == int(keep.sum()) < len(ids)
        assert torch.equal(kept, full[:, keep])  # same teacher batches: bit for bit
        dropped += int((~keep).sum())
    assert dropped == len(samples) * int((builder.tokens(samples.queries[0]).input_ids == image_token).sum())
    assert store_stats(text.path)["bytes_on_disk"] < store_stats(every.path)["bytes_on_disk"]


def test_training_aligns_exactly_the_kept_positions(stores, setup, tmp_path):
    params, loaded, samples, builder = setup
    _, text = stores
    tr, ex = params.train, params.extract
    summary = train(PARAMS, text.path, tmp_path / "run", [*TEXT, "train.epochs=1"], loaded=loaded)
    logged = float((tmp_path / "run" / "train_log.tsv").read_text().splitlines()[1].split("\t")[4])
    # the first step by hand: the initial shift, the first batch, the student states at text positions only
    view = loaded.view
    shift = MimicShift(spec_for(view), torch.Generator().manual_seed(tr.seed))
    first = epoch_batches(samples, 0, tr.batch_size, tr.seed)[0]
    batch, lengths = student_batch(builder, samples, first)
    layers = list(range(view.geometry.num_layers))
    with attach(loaded.model, shift), torch.no_grad():
        got, _ = forward_query_states(loaded.model, view, batch, lengths, ex.site, layers)
    image_token = view.image_token_id
    errors = []
    for row, j in enumerate(first):
        keep = builder.tokens(samples.demos(j)[0]).input_ids != image_token
        errors.append(got.states[row][:, keep] - text.read(j)[0])  # (L, kept, hidden)
    by_hand = torch.cat(errors, 1).square().mean(dim=(1, 2)).mean().item()
    assert logged == pytest.approx(by_hand, rel=1e-4)
    assert summary["steps"] == len(epoch_batches(samples, 0, tr.batch_size, tr.seed))
