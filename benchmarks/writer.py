"""The cache writer at real geometry: zarr's own write path vs the hand-written shard writer (cache_shards.py).

    .venv/bin/python benchmarks/writer.py          # ~2 minutes on 2 cores, ~1.5 GB of RAM

Random bfloat16 states of Idefics2-8b's text geometry (32 layers x 4096 hidden), lossless codec, written as
`mimic extract` writes them (staged batches, one teacher batch per call). "shards" is the writer as shipped
(whole shards encoded on a thread pool and written as files); "zarr" is the same writer with every write going
through zarr's own chunk pipeline. The two alternate, three rounds each; MB/s counts the states' raw bytes.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipeline.cache.store import CacheReader, Layout
from pipeline.cache.writer import CacheWriter


def write(path: Path, layout: Layout, samples: list[torch.Tensor], batch: int, zarr_only: bool) -> float:
    """Seconds to write and finish a store of `samples`."""
    start = time.perf_counter()
    writer = CacheWriter.open(
        path, {"benchmark": 1}, layout, [s.shape[1] for s in samples], [0] * len(samples)
    )
    if zarr_only:
        writer._shards = {}  # every write through zarr's pipeline (benchmark only)
    for first in range(0, len(samples), batch):
        rows = [(i, samples[i], None, None) for i in range(first, min(first + batch, len(samples)))]
        writer.write_many(rows, False)
    writer.finish()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=160, help="mean tokens per sample (query + answer)")
    parser.add_argument("--batch", type=int, default=4, help="samples per write call (a teacher batch)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.tokens // 2, args.tokens * 3 // 2, (args.samples,), generator=g).tolist()
    samples = [torch.randn(args.layers, n, args.hidden, generator=g).to(torch.bfloat16) for n in lengths]
    raw = sum(s.numel() for s in samples) * 2
    layout = Layout(num_layers=args.layers, hidden_size=args.hidden, dtype="bfloat16", codec="lossless")
    seconds = {"shards": [], "zarr": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for mode in ("shards", "zarr") if r % 2 == 0 else ("zarr", "shards"):
                path = Path(tmp) / f"{mode}-{r}"
                seconds[mode].append(write(path, layout, samples, args.batch, mode == "zarr"))
                if r == 0:  # both stores hold the same values
                    reader = CacheReader.open(path)
                    assert all(torch.equal(reader.read(i)[0], samples[i]) for i in range(0, len(samples), 5))
                shutil.rmtree(path)
    print(
        f"{args.samples} samples, {sum(lengths)} tokens, {args.layers} x {args.hidden} bf16: {raw / 1e9:.2f} GB raw"
    )
    print(f"{'writer':<8} {'best MB/s':>10} {'median MB/s':>12}")
    for mode, values in seconds.items():
        print(f"{mode:<8} {raw / 1e6 / min(values):>10.0f} {raw / 1e6 / statistics.median(values):>12.0f}")
    ratio = statistics.median(z / s for z, s in zip(seconds["zarr"], seconds["shards"]))
    print(
        f"zarr / shards time, median of paired rounds: {ratio:.2f}x (within 5% would retire cache_shards.py)"
    )


if __name__ == "__main__":
    main()
