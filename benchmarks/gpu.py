"""GPU checks of issue 20 on one H100/H200: exactness of the fused CUDA attention path, and what MimIC costs at
real geometry (attention heads, decoding, extraction, training), in one run of at most ~6 minutes.

    .venv/bin/python benchmarks/gpu.py --out docs/gpu.json            # on the GPU machine
    .venv/bin/python benchmarks/gpu.py --dry-run --out /tmp/gpu.json  # tiny sizes on the CPU (< 1 minute)

Sections (`--only a,b` runs some; the JSON is rewritten after each, so a run cut short keeps what it measured):
  a  out, lse and q/k/v gradients of pipeline.attention against float64 math, bf16 / fp16 / fp32, fused and
     materialized paths (+ the self-check's verdicts), then ../shared/tools/gpu_lse_check.py (outside check)
  b  one Mistral self-attention module at Idefics2-8b text geometry (32 heads, 8 KV heads, head_dim 128, bf16,
     random init), batch 1: plain SDPA vs MimIC (fused) vs MimIC (materialized), forward and forward+backward
  c  per-token decode latency, MimIC vs zero-shot, `generate` on a random-init 8B-geometry decoder
  d  `mimic extract`'s loop vs bare teacher forwards on that decoder (the embedded task's prompts)
  e  one training epoch from the cache vs with the online teacher on that decoder, 8 shots

Sections c-e: no 8B multimodal checkpoint is needed (or written): the embedded LLaVA's processor, CLIP tower and
projector around a random-init Mistral decoder of 8B text geometry, built in memory; `mimic extract`'s stage
function gets it in place of its by-name model loading. The dry run takes the CPU path (flash CPU kernel).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch
import transformers as tf
from gpu_setup import (  # benchmarks/gpu_setup.py: this script's folder is on sys.path
    DRY,
    ERRORS,
    FULL,
    OUTSIDE_CHECK,
    ROOT,
    SECTIONS,
    Sizes,
    build_decoder,
    materialized_heads,
    median_seconds,
    new_shift,
    peak_mib,
    seconds_of,
)

import pipeline.attention as attention
from pipeline.models import Loaded

# ---- a: exactness -------------------------------------------------------------------------------------------


def exactness_inputs(sizes: Sizes, device: torch.device):
    """Routing's two forms: a prefill (causal + left padding folded into a [B,1,T,T] mask) and a decoding step
    (the last query against every key, mask [B,1,1,S]); GQA heads expanded by autograd-visible repeats."""
    b, h, kv, t, d = sizes.exact
    g = torch.Generator().manual_seed(0)
    base = [2 * torch.randn(b, h, t, d, generator=g)]
    base += [torch.randn(b, kv, t, d, generator=g), torch.randn(b, kv, t, d, generator=g)]
    upstream = [torch.randn(b, h, t, d, generator=g), torch.randn(b, h, t, generator=g)]
    visible = torch.arange(t)[None] >= torch.tensor([0, t // 4])[:, None]  # (B, S): row 1 left-padded
    keep = visible[:, None, None, :] & torch.ones(t, t, dtype=torch.bool).tril()  # (B,1,T,S)
    prefill = (base, keep, upstream)
    decode = ([base[0][:, :, -1:], *base[1:]], visible[:, None, None, :], [u[:, :, -1:] for u in upstream])
    return {"prefill": prefill, "decode": decode}


def outputs_and_grads(base, keep, upstream, dtype, device, fused) -> list[torch.Tensor]:
    leaves = [x.to(device, dtype).requires_grad_() for x in base]
    groups = leaves[0].shape[1] // leaves[1].shape[1]
    q, k, v = leaves[0], *(x.repeat_interleave(groups, 1) for x in leaves[1:])
    mask = torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, float("-inf")).to(device)
    out, lse = attention.attention_with_lse(q, k, v, mask, False, q.shape[-1] ** -0.5, fused=fused)
    loss = (out.double() * upstream[0].to(device, torch.float64)).sum()
    loss = loss + (lse.double() * upstream[1].to(device, torch.float64)).sum()
    return [x.detach().double() for x in (out, lse, *torch.autograd.grad(loss, leaves))]


def section_exactness(sizes: Sizes, device: torch.device, dry: bool) -> dict:
    fused = "the CPU flash kernel (dry run)" if dry else "the CUDA memory-efficient kernel"
    result = {
        "measures": f"max abs error vs float64 math on the same rounded inputs, (B, H, KV, T, D) = {sizes.exact}, "
        f"GQA expanded, left padding; fused = {fused}, forced (fused=True, no self-check)",
    }
    for case, (base, keep, upstream) in exactness_inputs(sizes, device).items():
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            rounded = [x.to(dtype).double() for x in base]
            want = outputs_and_grads(rounded, keep, upstream, torch.float64, device, False)
            for path, forced in (("fused", True), ("materialized", False)):
                try:
                    got = outputs_and_grads(base, keep, upstream, dtype, device, forced)
                    errors = {n: (a - b).abs().max().item() for n, a, b in zip(ERRORS, got, want)}
                except RuntimeError as err:  # a kernel this GPU or torch build refuses: the rest still runs
                    errors = {"error": f"{type(err).__name__}: {err}"[:300]}
                result.setdefault(str(dtype), {}).setdefault(case, {})[path] = errors
    for dtype in (torch.bfloat16, torch.float16, torch.float32):  # what `fused=None` then chooses
        base, keep, upstream = exactness_inputs(sizes, device)["prefill"]
        outputs_and_grads(base, keep, upstream, dtype, device, None)
        result[str(dtype)]["self_check_passed"] = verdict(device, dtype, sizes.exact[-1])
    result["outside_check"] = outside_check(dry)
    print_exactness(result)
    return result


def verdict(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool | None:
    """The self-check's verdict for the CUDA kernel (None: not run, as on the CPU path)."""
    where = str(torch.empty(0, device=device).device)  # "cuda:0", as the verdicts are keyed
    return attention._VERDICTS.get((where, dtype, head_dim))


def print_exactness(result: dict) -> None:
    for dtype in ("torch.bfloat16", "torch.float16", "torch.float32"):
        for case in ("prefill", "decode"):
            for path, e in result[dtype][case].items():
                cells = e.get("error") or " ".join(f"{n} {e[n]:.1e}" for n in ERRORS)
                print(f"a {dtype[6:]:<9} {case:<8} {path:<13} {cells}")
        print(f"a {dtype[6:]:<9} self-check passed: {result[dtype]['self_check_passed']}")
    print(f"a outside check ({OUTSIDE_CHECK.name}): {result['outside_check']['note']}")


def outside_check(dry: bool) -> dict:
    if dry:
        return {"note": "not run in the dry run"}
    if not OUTSIDE_CHECK.is_file():
        return {"note": f"skipped: {OUTSIDE_CHECK} is missing"}
    done = subprocess.run([sys.executable, str(OUTSIDE_CHECK)], capture_output=True, text=True, timeout=180)
    lines = (done.stdout + done.stderr).strip().splitlines()
    return {
        "returncode": done.returncode,
        "output": lines[-8:],
        "note": "passed" if done.returncode == 0 else "FAILED",
    }


# ---- b: attention heads -------------------------------------------------------------------------------------


def section_heads(sizes: Sizes, device: torch.device, dtype: torch.dtype) -> dict:
    loaded = build_decoder(sizes.heads, dtype, device)
    lm, attn = loaded.model.model.language_model, loaded.view.attention_modules()[0]
    shift = new_shift(loaded)
    rows = []
    for t in sizes.lengths:
        x = torch.randn(1, t, sizes.heads["hidden_size"], generator=torch.Generator().manual_seed(t))
        x = x.to(device, dtype)
        rotary = lm.rotary_emb(x, torch.arange(t, device=device)[None])
        for mode in ("fwd", "fwd+bwd"):
            row = {"tokens": t, "mode": mode}
            for method in ("plain", "fused", "materialized"):
                if method == "materialized" and not fits_materialized(sizes.heads, t, device):
                    row[method] = {"skipped": "the score matrices would not fit in free GPU memory"}
                    continue
                step = heads_step(attn, x, rotary, mode, shift if method != "plain" else None)
                attached = shift.attach(loaded.model) if method != "plain" else contextlib.nullcontext()
                with attached, materialized_heads(method == "materialized"):
                    seconds = median_seconds(step, device, sizes.repeats)
                    row[method] = {"seconds": seconds, "peak_mib": peak_mib(step, device)}
            rows.append(row)
    head_dim = sizes.heads["head_dim"]
    report = {
        "measures": "the self-attention module of one Mistral decoder layer (q/k/v/o projections, RoPE, attention; "
        "MimIC adds mu and v per head through pipeline.methods.routing), batch 1, random init, "
        f"median of {sizes.repeats}; fwd+bwd backpropagates to the layer input and the shift",
        "geometry": sizes.heads,
        "rows": rows,
        "memory_growth": memory_growth(rows),
        "fused_self_check_passed": verdict(device, dtype, head_dim),  # False: "fused" ran materialized
        "targets": {
            "fwd": sizes.targets["heads_fwd"],
            "fwd+bwd": sizes.targets["heads_fwd_bwd"],
            "memory": "linear in T",
        },
    }
    print_heads(report)
    return report


def heads_step(attn, x, rotary, mode: str, shift):
    def step():
        inputs = x.detach().requires_grad_(mode == "fwd+bwd")
        with torch.set_grad_enabled(mode == "fwd+bwd"):
            out = attn(hidden_states=inputs, position_embeddings=rotary, attention_mask=None)[0]
        if mode == "fwd+bwd":
            out.float().square().mean().backward()
            if shift is not None:
                shift.zero_grad(set_to_none=True)

    return step


def memory_growth(rows: list[dict]) -> dict:
    """Per mode and method: peak memory at each T over the peak at the T before (linear: the T ratio)."""
    growth = {}
    for mode in ("fwd", "fwd+bwd"):
        mine = [r for r in rows if r["mode"] == mode]
        for method in ("plain", "fused", "materialized"):
            ratios = []
            for before, after in zip(mine, mine[1:]):
                a, b = before[method].get("peak_mib"), after[method].get("peak_mib")
                if a and b:
                    ratios.append(
                        {
                            "tokens": after["tokens"],
                            "x_tokens": after["tokens"] / before["tokens"],
                            "x_memory": b / a,
                        }
                    )
            growth.setdefault(mode, {})[method] = ratios
    return growth


def fits_materialized(text: dict, t: int, device: torch.device) -> bool:
    """~8 float32 score-sized tensors live at once in the materialized forward+backward."""
    if device.type != "cuda":
        return True
    return 8 * 4 * text["num_attention_heads"] * t * t < 0.7 * torch.cuda.mem_get_info(device)[0]


def print_heads(report: dict) -> None:
    targets = report["targets"]
    print(
        f"b {'T':>5} {'mode':<8} {'plain ms':>9} {'fused ms':>9} {'ratio':>6} {'target':>6} {'mat. ms':>9}"
        f" {'ratio':>6} {'peak MiB plain/fused/mat.':>26}"
    )
    for row in report["rows"]:
        plain, fused, mat = row["plain"], row["fused"], row["materialized"]
        mat_ms = (
            f"{1000 * mat['seconds']:>9.2f} {mat['seconds'] / plain['seconds']:>6.2f}"
            if "seconds" in mat
            else f"{'skipped':>16}"
        )
        peaks = "/".join(
            "-" if m.get("peak_mib") is None else f"{m['peak_mib']:.0f}" for m in (plain, fused, mat)
        )
        print(
            f"b {row['tokens']:>5} {row['mode']:<8} {1000 * plain['seconds']:>9.2f} {1000 * fused['seconds']:>9.2f}"
            f" {fused['seconds'] / plain['seconds']:>6.2f} {targets[row['mode']]:>6} {mat_ms} {peaks:>26}"
        )
    for mode, methods in report["memory_growth"].items():
        cells = [
            f"{m} " + ", ".join(f"x{g['x_memory']:.1f} at x{g['x_tokens']:.0f} tokens" for g in gs)
            for m, gs in methods.items()
            if gs
        ]
        print(f"b memory growth {mode}: {'; '.join(cells) or 'not measured'}")
    print(
        f"b target: peak memory linear in T (x4 tokens -> x4 memory, not x16); self-check passed: "
        f"{report['fused_self_check_passed']}"
    )


# ---- c: decoding --------------------------------------------------------------------------------------------


def section_decode(loaded: Loaded, sizes: Sizes, device: torch.device) -> dict:
    model = loaded.model
    ids = torch.randint(5, 64, (1, sizes.prompt), generator=torch.Generator().manual_seed(0)).to(device)
    shift = new_shift(loaded)

    def generate(method: str, tokens: int):
        attached = shift.attach(model) if method == "mimic" else contextlib.nullcontext()
        with attached, torch.no_grad():  # as `mimic evaluate`: attached around its own generate call
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=0,
            )

    methods = ("zero_shot", "mimic")
    for method in methods:
        generate(method, sizes.new_tokens)  # warm-up
    per_token = {m: [] for m in methods}
    for r in range(sizes.rounds):
        for method in methods if r % 2 == 0 else methods[::-1]:
            full = seconds_of(lambda m=method: generate(m, sizes.new_tokens), device)
            first = seconds_of(lambda m=method: generate(m, 1), device)
            per_token[method].append((full - first) / (sizes.new_tokens - 1))
    ms = {m: 1000 * statistics.median(v) for m, v in per_token.items()}
    report = {
        "measures": f"generate, batch 1, {sizes.prompt}-token prompt, {sizes.new_tokens} new tokens greedy: per "
        "token = (time of all tokens - time of the first) / (tokens - 1), median of "
        f"{sizes.rounds} rounds; a random-init Mistral decoder {sizes.decoder}; MimIC on every layer",
        "ms_per_token": ms,
        "ratio": ms["mimic"] / ms["zero_shot"],
        "target": sizes.targets["decode"],
        "reference_implementation_ratio": 1.32,
        "fused_self_check_passed": verdict(
            device, next(model.parameters()).dtype, loaded.view.geometry.head_dim
        ),
    }
    print(
        f"c decode ms/token: zero-shot {ms['zero_shot']:.2f}, MimIC {ms['mimic']:.2f}, ratio "
        f"{report['ratio']:.3f} (target <= {report['target']}, reference implementation 1.32)"
    )
    return report


# ---- d, e: extraction and training --------------------------------------------------------------------------


def overrides_for(sizes: Sizes, device: torch.device, dtype: torch.dtype) -> list[str]:
    n, support = sizes.queries, sizes.support
    return [
        f"model.dtype={str(dtype).removeprefix('torch.')}",
        f"model.device={device}",
        f"data.train={{kind: embedded, task: color, split: support, n: {support + n}, seed: 0}}",
        f"data.eval={{kind: embedded, task: color, split: query, n: {n}, seed: 0}}",
        f"data.n_train={n}",
        f"data.n_support={support}",
        f"data.n_eval={n}",
        "data.n_val=0",
        f"extract.k={sizes.shots}",
        f"evaluate.k={sizes.shots}",
        f"extract.batch_size={sizes.batch}",
        f"train.batch_size={sizes.batch}",
        "train.epochs=1",
        "train.method=mimic",
        f"train.precision={'bf16' if device.type == 'cuda' else 'fp32'}",
    ]


@contextlib.contextmanager
def serving(loaded: Loaded):
    """`mimic extract` loads its model by name: here it gets the one built in memory."""
    import stages.extract

    original = stages.extract.load_model
    stages.extract.load_model = lambda *args, **kwargs: loaded
    try:
        yield
    finally:
        stages.extract.load_model = original


def teacher_seconds(loaded: Loaded, overrides: list[str], hooks: bool, device: torch.device) -> float:
    """The extract loop's forwards without writes (benchmarks/extract.py's loop); with `hooks`, states recorded."""
    from extract import teacher_loop  # benchmarks/extract.py: this script's folder is on sys.path

    from pipeline.config import load_params

    params = load_params(ROOT / "params.yaml", overrides)
    return seconds_of(teacher_loop(params, loaded, hooks, device), device)


def section_extract(loaded: Loaded, sizes: Sizes, device: torch.device, dtype, tmp: Path) -> dict:
    from stages.extract import extract

    overrides = overrides_for(sizes, device, dtype)
    times = {"plain": [], "hooks": [], "extract": []}
    teacher_seconds(loaded, overrides, False, device)  # warm-up
    for r in range(sizes.rounds):
        times["plain"].append(teacher_seconds(loaded, overrides, False, device))
        times["hooks"].append(teacher_seconds(loaded, overrides, True, device))
        with serving(loaded):
            stats = extract(ROOT / "params.yaml", tmp / f"extract-{r}.zarr", overrides)
        times["extract"].append(stats["seconds"])
    paired = statistics.median(e / p for e, p in zip(times["extract"], times["plain"]))
    report = {
        "measures": f"{sizes.queries} teacher prompts of the embedded task at {sizes.shots} shots, batch "
        f"{sizes.batch}, on the random-init decoder {sizes.decoder}: plain = the loop's forwards, no hooks or "
        "writes; hooks = recording and gathering, no writes; extract = `mimic extract`'s loop with its Zarr "
        "writes (its `seconds`); best of rounds and the median of each round's ratio",
        "seconds": {k: min(v) for k, v in times.items()},
        "ratio_best": min(times["extract"]) / min(times["plain"]),
        "ratio_paired": paired,
        "bytes_on_disk": stats["bytes_on_disk"],
        "target": sizes.targets["extract"],
    }
    s = report["seconds"]
    print(
        f"d plain {s['plain']:.2f} s, hooks {s['hooks']:.2f} s, extract {s['extract']:.2f} s: extract/plain "
        f"{report['ratio_best']:.2f} best, {paired:.2f} paired (target <= {report['target']})"
    )
    return report


def section_train(loaded: Loaded, sizes: Sizes, device: torch.device, dtype, tmp: Path) -> dict:
    from stages.extract import extract
    from stages.train import train

    overrides = overrides_for(sizes, device, dtype)
    with serving(loaded):
        extract(ROOT / "params.yaml", tmp / "train-cache.zarr", overrides)
    epochs = {"cache": [], "online": []}
    for r in range(sizes.rounds + 1):  # the first round warms up and is not counted
        for way, cache in (("cache", tmp / "train-cache.zarr"), ("online", None)):
            got = train(ROOT / "params.yaml", cache, tmp / f"{way}-{r}", overrides, loaded=loaded)
            if r:
                epochs[way].append(got["seconds_per_epoch"])
    best = {k: min(v) for k, v in epochs.items()}
    report = {
        "measures": f"one epoch of `mimic train` (MimIC, {sizes.queries} queries, batch {sizes.batch}, "
        f"{sizes.shots} shots) from the cache vs with the online teacher, on the random-init decoder "
        f"{sizes.decoder}; best of {sizes.rounds} after a warm-up round",
        "seconds_per_epoch": best,
        "online_over_cache": best["online"] / best["cache"],
    }
    print(
        f"e s/epoch: cache {best['cache']:.2f}, online {best['online']:.2f}: online/cache "
        f"{report['online_over_cache']:.2f}"
    )
    return report


# ---- main ---------------------------------------------------------------------------------------------------


def sections(text: str) -> list[str]:
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in chosen if s not in SECTIONS]
    if bad or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown sections {bad or text!r}: choose from {','.join(SECTIONS)}"
        )
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON written after every section")
    parser.add_argument("--only", type=sections, default=list(SECTIONS), help="e.g. a,b (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks the script")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device here: run on the GPU machine, or pass --dry-run")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pipeline.attention").setLevel(logging.INFO)  # the self-check's verdicts
    sizes = DRY if args.dry_run else FULL
    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    report = {"about": about(sizes, device, args.dry_run)}
    failed = []
    decoder = None
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            start = time.perf_counter()
            try:
                if name in "cde" and decoder is None:
                    decoder = build_decoder(sizes.decoder, dtype, device)
                report[name] = run_section(name, sizes, device, dtype, decoder, Path(tmp), args.dry_run)
            except Exception as err:  # one failing section must not lose the others' figures
                traceback.print_exc()
                report[name] = {"error": f"{type(err).__name__}: {err}"}
                failed.append(name)
            report[name]["section_seconds"] = time.perf_counter() - start
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")
    total = sum(report[n]["section_seconds"] for n in args.only)
    print(
        f"sections {','.join(args.only)}: {total:.0f} s; failed: {','.join(failed) or 'none'}; wrote {args.out}"
    )
    return 1 if failed else 0


def run_section(name, sizes, device, dtype, decoder, tmp: Path, dry: bool) -> dict:
    if name == "a":
        return section_exactness(sizes, device, dry)
    if name == "b":
        return section_heads(sizes, device, dtype)
    if name == "c":
        return section_decode(decoder, sizes, device)
    if name == "d":
        return section_extract(decoder, sizes, device, dtype, tmp)
    return section_train(decoder, sizes, device, dtype, tmp)


def about(sizes: Sizes, device: torch.device, dry: bool) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "device": name,
        "dry_run": dry,
        "torch": torch.__version__,
        "transformers": tf.__version__,
        "sizes": asdict(sizes),
        "date": time.strftime("%Y-%m-%d"),
    }


if __name__ == "__main__":
    sys.exit(main())
