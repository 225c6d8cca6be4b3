"""What a teacher cache was computed from: stored in the store, checked before training reads it."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from PIL import Image

from pipeline import __version__
from pipeline.config import Params
from pipeline.errors import MimicError
from pipeline.models import Loaded, config_fingerprint, tokenizer_fingerprint, weights_fingerprint
from pipeline.sources import sources_hash
from pipeline.splits import Splits


def _ids_hash(items) -> str:
    return hashlib.sha256(json.dumps([i.id for i in items]).encode()).hexdigest()[:16]


@functools.cache
def _file_hash(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of a file's bytes; (size, mtime) in the key so that a file edited in place is read again."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _image_hash(image) -> str:
    if isinstance(image, Image.Image):
        encoded = getattr(getattr(image, "fp", None), "getvalue", None)
        if encoded is not None:  # not decoded yet (a table's image bytes): hash them, decode nothing
            return hashlib.sha256(encoded()).hexdigest()
        return hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()
    path = Path(image)
    try:
        stat = path.stat()
    except OSError as err:
        raise MimicError(
            f"image not found: {path}; check image_dir/image_root and the image file names"
        ) from err
    return _file_hash(path.resolve(), stat.st_size, stat.st_mtime_ns)


def content_hash(items) -> str:
    """A hash of what the items ARE, not where they are stored: ids, questions, every reference answer and
    the bytes of every image. Moving the dataset keeps it; editing an annotation or an image changes it."""
    digest = hashlib.sha256()
    for item in items:
        record = [item.id, item.question, list(item.answers), [_image_hash(i) for i in item.images]]
        digest.update(json.dumps(record).encode())
    return digest.hexdigest()[:16]


def image_processor_fingerprint(processor) -> str:
    """A hash of the image processor's settings (size, resampling, mean and std: they change the pixels)."""
    images = getattr(processor, "image_processor", None)
    text = images.to_json_string() if images is not None else ""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def teacher_fingerprint(params: Params, loaded: Loaded, splits: Splits, layers: list[int]) -> dict:
    """Model and tokenizer first: a cache for another model is reported as such, before anything else."""
    ex = params.extract
    return {
        "model_config": config_fingerprint(loaded.model.config),
        "model_weights": weights_fingerprint(loaded.model),
        "tokenizer": tokenizer_fingerprint(loaded.processor),
        "image_processor": image_processor_fingerprint(loaded.processor),
        "model_dtype": params.model.dtype,
        # the data's content, not its paths: a moved dataset keeps its cache, an edited one does not
        "support_content": content_hash(splits.support),
        "train_content": content_hash(splits.train),
        "support_ids": _ids_hash(splits.support),
        "train_ids": _ids_hash(splits.train),
        "n_train": len(splits.train),
        "k": ex.k,
        "m": ex.m,
        "icd_seed": ex.seed,
        "icd": ex.icd if ex.icd == "random" else f"rices:{params.data.rices_encoder or 'own vision tower'}",
        "prompt": params.prompt,
        "site": ex.site,
        "layers": layers,
        "codec": ex.codec,
        "topk": ex.topk,
        "last_token": ex.last_token,
        "positions": ex.positions,
        "package_version": __version__,
        "code": sources_hash("stages.extract"),  # the teacher's code, comments and docstrings aside
    }
