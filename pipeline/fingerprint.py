"""What a teacher cache was computed from: stored in the store, checked before training reads it."""

from __future__ import annotations

import hashlib
import json

from pipeline import __version__
from pipeline.config import Params
from pipeline.models import Loaded, config_fingerprint, tokenizer_fingerprint, weights_fingerprint
from pipeline.splits import Splits


def _ids_hash(items) -> str:
    return hashlib.sha256(json.dumps([i.id for i in items]).encode()).hexdigest()[:16]


def teacher_fingerprint(params: Params, loaded: Loaded, splits: Splits, layers: list[int]) -> dict:
    """Model and tokenizer first: a cache for another model is reported as such, before anything else."""
    ex = params.extract
    return {
        "model_config": config_fingerprint(loaded.model.config),
        "model_weights": weights_fingerprint(loaded.model),
        "tokenizer": tokenizer_fingerprint(loaded.processor),
        "model_dtype": params.model.dtype,
        "dataset": params.data.train,
        "split_seed": params.data.seed,
        "support_ids": _ids_hash(splits.support),
        "train_ids": _ids_hash(splits.train),
        "n_train": len(splits.train),
        "k": ex.k,
        "m": ex.m,
        "icd_seed": ex.seed,
        "prompt": params.prompt,
        "site": ex.site,
        "layers": layers,
        "codec": ex.codec,
        "topk": ex.topk,
        "positions": ex.positions,
        "package_version": __version__,
    }
