"""Cost of MimIC heads on a CPU decoder: fused log-sum-exp (ours) vs a materialized-logsumexp implementation.

    .venv/bin/python benchmarks/attention.py            # lengths 512 1024 2048, ~3 minutes on 2 cores

Each (method, length, mode) runs in its own subprocess so that its peak resident memory is its own; times are
medians of repeated runs. Ratios are against the plain model (SDPA, no shift) measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

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


def run_one(method: str, length: int, mode: str, repeats: int) -> dict:
    """Time one configuration; runs inside its own process."""
    import pipeline.attention as attention
    from pipeline.families import Adapter
    from pipeline.shift import MimicShift, attach, spec_for

    torch.set_num_threads(2)
    model = build_model()
    ids = torch.randint(0, DECODER["vocab_size"], (1, length), generator=torch.Generator().manual_seed(0))
    embeds = model.get_input_embeddings()(ids)
    shift = MimicShift(spec_for(Adapter(model)), torch.Generator().manual_seed(0))
    if method == "materialized":
        fused_fn = attention.attention_with_lse
        attention_with_lse = lambda *a, **k: fused_fn(*a, **{**k, "fused": False})
        import pipeline.shift as shift_module

        shift_module.attention_with_lse = attention_with_lse
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step():
        x = embeds.detach().requires_grad_(mode == "fwd+bwd" and method == "plain")
        if mode == "fwd":
            with torch.no_grad():
                model(inputs_embeds=x)
        else:
            model(inputs_embeds=x, output_hidden_states=True).hidden_states[-1].square().mean().backward()

    times = []
    context = attach(model, shift) if method != "plain" else _null()
    with context:
        shift.requires_grad_(mode == "fwd+bwd")
        step()  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss
    return {"seconds": statistics.median(times), "peak_mib": max(peak, 0) / 1024}


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "LENGTH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        method, length, mode = args.one
        print(json.dumps(run_one(method, int(length), mode, args.repeats)))
        return
    rows = []
    for length in args.lengths:
        for mode in ("fwd", "fwd+bwd"):
            result = {}
            for method in METHODS:
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--one",
                        method,
                        str(length),
                        mode,
                        "--repeats",
                        str(args.repeats),
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                result[method] = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((length, mode, result))
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
