"""Peak resident memory of `mimic extract` and `mimic evaluate` as the data grows (200 vs 2,000 queries).

    .venv/bin/python benchmarks/memory.py          # ~5 minutes on 2 cores

A tiny Idefics2 checkpoint with real tokenizer and processor classes (tests/real_checkpoints.py) and a
VQAv2-layout fixture of JPEGs of four sizes. Each stage runs as its own `mimic` process; its peak RSS is read
with getrusage in a fresh parent, so runs do not see each other. Memory that grows with the queries (images or
prompts held for the whole run) shows as a ratio above 1; the target is at most 1.3x for 10x the queries.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from real_checkpoints import save_tiny_checkpoint, write_vqa_fixture  # noqa: E402

PEAK = "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); " + (
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def peak_mib(*args: str) -> float:
    """Peak RSS of one `mimic` run, in MiB (a fresh parent process measures only that child)."""
    command = [sys.executable, "-c", PEAK, sys.executable, "-m", "stages.cli", *args]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def write_params(path: Path, checkpoint: Path, train: dict, evaluation: dict, n: int, family_k: int) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"]["name"] = str(checkpoint)
    params["data"].update(train=train, eval=evaluation, n_support=200, n_train=n, n_eval=n, n_val=0)
    params["extract"].update(k=family_k, batch_size=16)
    params["train"].update(epochs=1, batch_size=8)
    params["evaluate"].update(k=family_k, batch_size=32, max_new_tokens=3)
    path.write_text(yaml.safe_dump(params))
    return path


def real_size_images(checkpoint: Path, edge: int) -> Path:
    """Resize images to `edge` pixels on the longest side (the tiny processor's 32 would hide retained images:
    a 448-pixel Idefics2 image is 1.6 MB of float32 pixels, ~200x a 32-pixel one)."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = checkpoint / name
        config = json.loads(path.read_text())
        images = config.get("image_processor", config)
        images["size"] = {"longest_edge": edge, "shortest_edge": edge // 2}
        path.write_text(json.dumps(config, indent=2))
    return checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="idefics2")
    parser.add_argument("--sizes", type=int, nargs=2, default=(200, 2000))
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--image-edge", type=int, default=224, help="longest image side after resizing")
    args = parser.parse_args()
    small, large = args.sizes
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = real_size_images(save_tiny_checkpoint(args.family, tmp / "model"), args.image_edge)
        train = write_vqa_fixture(tmp / "data", 200 + large, "train2014")
        evaluation = write_vqa_fixture(tmp / "data", large, "val2014", seed=1)
        # a shift to evaluate, trained on a few queries
        tiny = write_params(tmp / "tiny.yaml", checkpoint, train, evaluation, 16, args.k)
        peak_mib("extract", "--params", str(tiny), "--out", str(tmp / "tiny.zarr"))
        peak_mib(
            "train", "--params", str(tiny), "--cache", str(tmp / "tiny.zarr"), "--run-dir", str(tmp / "run")
        )
        rows = []
        for n in (small, large):
            params = str(write_params(tmp / f"p{n}.yaml", checkpoint, train, evaluation, n, args.k))
            extract = peak_mib("extract", "--params", params, "--out", str(tmp / f"c{n}.zarr"))
            evaluate = peak_mib(
                "evaluate", "--params", params, "--run-dir", str(tmp / "run"),
                "--metrics", str(tmp / f"m{n}.json"), "--predictions", str(tmp / f"p{n}.jsonl"),
            )  # fmt: skip
            rows.append((n, extract, evaluate))
    print(
        f"{args.family} tiny checkpoint, images resized to {args.image_edge} px, k={args.k}, peak RSS (MiB)"
    )
    print(f"{'queries':>8} {'extract':>9} {'evaluate':>9}")
    for n, extract, evaluate in rows:
        print(f"{n:>8} {extract:>9.0f} {evaluate:>9.0f}")
    (_, e0, v0), (_, e1, v1) = rows
    print(f"ratio {large}/{small}: extract {e1 / e0:.2f}x, evaluate {v1 / v0:.2f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()
