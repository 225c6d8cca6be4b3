"""Cost of MimIC heads on a CPU decoder: fused log-sum-exp (ours) vs a materialized-logsumexp implementation.

    .venv/bin/python benchmarks/attention.py            # lengths 512 1024 2048, ~3 minutes on 2 cores

Times are the best of repeated runs with the three methods alternated in one process (so a burst of load
elsewhere hits all of them alike); peak resident memory of one step is measured in a fresh subprocess per
(method, length, mode). Ratios are against the plain model (SDPA, no shift) measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers as tf

METHODS = ("plain", "fused", "materialized")
DECODER = dict(
    vocab_size=1000,
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)


def build_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = tf.LlavaConfig(
        text_config=dict(model_type="qwen2", **DECODER),
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
    )
    model = tf.LlavaForConditionalGeneration(config).eval().requires_grad_(False)
    model.set_attn_implementation("sdpa")
    return model


def make_step(method: str, length: int, mode: str):
    """A closure running one forward (or forward+backward) of `method`; attach/patching done once."""
    import pipeline.attention as attention
    import pipeline.methods.routing as shift_module
    from pipeline.families import ModelView
    from pipeline.methods.mimic import MimicShift, attach, spec_for

    model = build_model()
    ids = torch.randint(0, DECODER["vocab_size"], (1, length), generator=torch.Generator().manual_seed(0))
    embeds = model.get_input_embeddings()(ids)
    shift = MimicShift(spec_for(ModelView(model)), torch.Generator().manual_seed(0))
    shift.requires_grad_(mode == "fwd+bwd")
    fused = method != "materialized"

    def step():
        x = embeds.detach().requires_grad_(mode == "fwd+bwd" and method == "plain")
        shift_module.attention_with_lse = lambda *a, **k: attention.attention_with_lse(
            *a, **{**k, "fused": fused}
        )
        context = attach(model, shift) if method != "plain" else _null()
        with context:
            if mode == "fwd":
                with torch.no_grad():
                    model(inputs_embeds=x)
            else:
                model(inputs_embeds=x, output_hidden_states=True).hidden_states[-1].square().mean().backward()

    return step


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory(method: str, length: int, mode: str) -> float:
    """Peak resident memory (MiB) one step adds above the loaded model: the kernel's high-water mark is reset
    (`clear_refs` 5) after the warm-up, then read after one more step."""
    step = make_step(method, length, mode)
    step()
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kib("VmRSS")
    step()
    return max(_status_kib("VmHWM") - base, 0) / 1024


def time_interleaved(length: int, mode: str, repeats: int) -> dict[str, float]:
    """Best-of-`repeats` seconds per method, the methods alternated so load bursts hit all of them alike."""
    steps = {m: make_step(m, length, mode) for m in METHODS}
    for step in steps.values():
        step()  # warm-up
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(repeats):
        for m, step in steps.items():
            start = time.perf_counter()
            step()
            times[m].append(time.perf_counter() - start)
    return {m: min(t) for m, t in times.items()}


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--memory", nargs=3, metavar=("METHOD", "LENGTH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.memory:
        method, length, mode = args.memory
        print(json.dumps({"peak_mib": peak_memory(method, int(length), mode)}))
        return
    rows = []
    for length in args.lengths:
        for mode in ("fwd", "fwd+bwd"):
            seconds = time_interleaved(length, mode, args.repeats)
            memory = {}
            for method in METHODS:
                out = subprocess.run(
                    [sys.executable, __file__, "--memory", method, str(length), mode],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                memory[method] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]
            rows.append((length, mode, {m: {"seconds": seconds[m], "peak_mib": memory[m]} for m in METHODS}))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, decoder {DECODER}")
    print(
        f"{'T':>5} {'mode':<8} {'plain s':>8} {'fused s':>8} {'ratio':>6} {'materialized s':>15} {'ratio':>6}"
        f" {'peak MiB plain/fused/materialized':>34}"
    )
    for length, mode, r in rows:
        p, f, m = r["plain"], r["fused"], r["materialized"]
        print(
            f"{length:>5} {mode:<8} {p['seconds']:>8.3f} {f['seconds']:>8.3f} {f['seconds'] / p['seconds']:>6.2f}"
            f" {m['seconds']:>15.3f} {m['seconds'] / p['seconds']:>6.2f}"
            f" {p['peak_mib']:>12.0f}/{f['peak_mib']:.0f}/{m['peak_mib']:.0f}"
        )


if __name__ == "__main__":
    main()
