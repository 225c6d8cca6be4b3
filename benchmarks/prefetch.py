"""How fast teacher prompts are built from real-sized images, batch by batch and with `data.workers` threads
building them ahead (pipeline/prefetch.py).

    .venv/bin/python benchmarks/prefetch.py         # 3 families, 32 samples, k = 4, 0 / 1 / 2 workers, 2 rounds

No model runs: this is the input side of `mimic extract` alone, the real processors with their default image
settings (Idefics2 980 px with splitting, Qwen2-VL's default pixel range, LLaVA-OneVision's anyres) on
640 x 480 JPEGs, the size of a COCO image. On a GPU the teacher's forward takes milliseconds per sample, so
these samples/s bound extract's speed there. Each round times every worker count once, in turn; the best
round is reported. The threads share this machine's cores with each other (and, in a real run, with the
model's own threads): the speed-up is bounded by the number of cores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import transformers as tf
from PIL import Image

from pipeline.data import Item
from pipeline.families import family_for
from pipeline.prefetch import ahead
from pipeline.prompts import PromptBuilder, PromptTemplate
from pipeline.samples import teacher_batch, training_samples

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from real_checkpoints import VIDEO_FREE_PROCESSORS, byte_level_tokenizer, metaspace_tokenizer  # noqa: E402

TEMPLATE = "{image}Question: {question} Short answer: {answer}\n"


def processors() -> dict[str, tf.ProcessorMixin]:
    """Each family's real processor class with its image processor's default settings (the tokenizers are the
    tests' small ones: tokenizing is a small part of the cost)."""
    idefics2 = tf.Idefics2Processor(
        tf.Idefics2ImageProcessorPil(do_image_splitting=True),
        metaspace_tokenizer(("<fake_token_around_image>", "<image>", "<end_of_utterance>")),
        image_seq_len=64,
    )
    qwen = VIDEO_FREE_PROCESSORS["qwen2_vl"](
        tf.Qwen2VLImageProcessorPil(),
        byte_level_tokenizer(("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")),
    )
    onevision = VIDEO_FREE_PROCESSORS["llava_onevision"](
        tf.LlavaOnevisionImageProcessorPil(),
        byte_level_tokenizer(("<image>", "<video>")),
        num_image_tokens=729,
        vision_feature_select_strategy="full",
    )
    return {"idefics2": idefics2, "qwen2_vl": qwen, "llava_onevision": onevision}


def items(directory: Path, n: int, prefix: str) -> list[Item]:
    """n items, each with its own 640 x 480 JPEG of smooth random colour (JPEG-compressible, like a photo)."""
    rng = np.random.default_rng(len(prefix))
    out = []
    for i in range(n):
        coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        path = directory / f"{prefix}{i}.jpg"
        Image.fromarray(coarse).resize((640, 480), Image.BILINEAR).save(path, quality=90)
        out.append(Item(f"{prefix}{i}", (path,), "What colour is it?", ("red",)))
    return out


def build_all(processor, family, samples, batch: int, workers: int) -> float:
    """Seconds to build every teacher batch with `workers` workers, from a fresh builder (no cached images)."""
    builder = PromptBuilder(processor, family, PromptTemplate(TEMPLATE))
    for query in samples.queries:  # as extract does before its loop: the query rounds are counted up front
        builder.tokens(query)
    chunks = [range(s, min(s + batch, len(samples))) for s in range(0, len(samples), batch)]
    start = time.perf_counter()
    for _ in ahead(lambda c: teacher_batch(builder, samples, chunks[c]), len(chunks), workers):
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        queries, support = items(Path(tmp), args.samples, "q"), items(Path(tmp), 64, "s")
        samples = training_samples(queries, support, args.k, 1, seed=0)
        print(
            f"{args.samples} teacher prompts of {args.k} demonstrations + the query (640 x 480 JPEGs), batch {args.batch}"
        )
        print("| family | workers | seconds (best of rounds) | samples/s | speed-up |")
        print("|---|---|---|---|---|")
        for name, processor in processors().items():
            family = family_for(name)
            times = {w: [] for w in args.workers}
            for _ in range(args.rounds):
                for w in args.workers:
                    times[w].append(build_all(processor, family, samples, args.batch, w))
            base = min(times[args.workers[0]])
            for w in args.workers:
                best = min(times[w])
                print(f"| {name} | {w} | {best:.2f} | {args.samples / best:.1f} | {base / best:.2f}x |")


if __name__ == "__main__":
    main()
