"""`mimic evaluate`: zero-shot, k-shot ICL and MimIC on the same held-out queries, same prompts, same metric.

Recipe: params -> model -> splits -> prompts per method -> batched generation -> metric -> metrics JSON and
per-sample predictions JSONL (both tracked by DVC).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

from pipeline.config import load_params
from pipeline.errors import MimicError
from pipeline.evaluation import GenerationPrompts, generate_answers, score
from pipeline.icd import sample_icd_sets
from pipeline.models import load_model
from pipeline.prompts import PromptBuilder
from pipeline.shift import attach
from pipeline.shift_io import load_shift
from pipeline.splits import make_splits

log = logging.getLogger(__name__)
METHODS = ("zero_shot", "icl", "mimic")


def evaluate(
    params_path: Path,
    shift_dir: Path | None,
    metrics_path: Path,
    predictions_path: Path,
    overrides: list[str],
) -> dict:
    params = load_params(params_path, overrides)
    ev = params.evaluate
    unknown = [m for m in ev.methods if m not in METHODS]
    if unknown:
        raise MimicError(f"evaluate.methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    loaded = load_model(params.model.name, params.model.dtype, params.model.device)
    shift = None
    if "mimic" in ev.methods:  # checked before any generation
        if shift_dir is None or not shift_dir.is_dir():
            raise MimicError(f"run directory not found: {shift_dir} (train a shift with `mimic train` first)")
        shift = load_shift(shift_dir, loaded.adapter, device=params.model.device)
    splits = make_splits(params.data)
    builder = PromptBuilder.for_model(loaded, params.prompt)
    queries = splits.eval
    icd = sample_icd_sets([q.id for q in queries], splits.support, ev.k, 1, ev.seed)
    kind = params.data.eval["kind"]
    report, rows = {}, [{"id": q.id, "question": q.question, "answers": list(q.answers)} for q in queries]
    for method in ev.methods:
        demos = [
            [splits.support[i] for i in icd[n][0]] if method == "icl" else [] for n in range(len(queries))
        ]
        prompts = GenerationPrompts(builder, demos, queries)
        context = attach(loaded.model, shift) if method == "mimic" else contextlib.nullcontext()
        with context:
            out = generate_answers(
                loaded.model,
                builder,
                prompts,
                ev.batch_size,
                ev.num_beams,
                ev.max_new_tokens,
                desc=method,
                max_batch_tokens=ev.max_batch_tokens,
            )
        value, per = score(kind, queries, out.answers)
        report[method] = {
            "score": round(value, 4),
            "samples": len(queries),
            "latency_ms_per_sample": round(1000 * out.seconds / len(queries), 3),
            "prompt_tokens_per_sample": round(sum(out.prompt_tokens) / len(queries), 2),
        }
        for row, answer, s in zip(rows, out.answers, per):
            row[method] = {"prediction": answer, "score": s}
    if "icl" in report and "mimic" in report:
        report["mimic_speedup_over_icl"] = round(
            report["icl"]["latency_ms_per_sample"] / report["mimic"]["latency_ms_per_sample"], 3
        )
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    predictions_path.parent.mkdir(parents=True, exist_ok=True)
    predictions_path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return report


def format_report(report: dict) -> str:
    """The terminal table: score, latency and prompt length per method."""
    lines = [f"{'method':<10} {'score':>8} {'ms/sample':>10} {'prompt tokens':>14}"]
    for method in METHODS:
        if method in report:
            r = report[method]
            lines.append(
                f"{method:<10} {r['score']:>8.2f} {r['latency_ms_per_sample']:>10.2f} {r['prompt_tokens_per_sample']:>14.1f}"
            )
    if "mimic_speedup_over_icl" in report:
        lines.append(
            f"MimIC (no demonstrations) is {report['mimic_speedup_over_icl']:.2f}x faster per sample than ICL"
        )
    return "\n".join(lines)
