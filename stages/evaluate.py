"""`mimic evaluate`: the prompt methods and every trained run on the same held-out queries, prompts and metric.

Recipe: params -> checks (model, outputs, shift) -> model -> splits -> prompts per method, built batch by batch
-> generation with the methods interleaved chunk by chunk (a warm-up chunk first, untimed) -> metric -> metrics
JSON, latency JSON, per-sample predictions JSONL and each method's predictions in the official result format.
"""

from __future__ import annotations

import contextlib
import json
import logging
import statistics
from pathlib import Path

from tqdm import tqdm

from pipeline.config import load_params
from pipeline.distributed import gather, rank_device, share, world
from pipeline.errors import MimicError
from pipeline.evaluation import GenerationPrompts, generate_answers, official_results, score, scored_as
from pipeline.icd import sample_icd_sets
from pipeline.methods import method_configs
from pipeline.methods.io import check_method_base, load_method
from pipeline.models import check_model, load_model, weights_fingerprint
from pipeline.outputs import check_writable, write_text_atomic
from pipeline.plots import method_scores
from pipeline.prefetch import in_waves
from pipeline.prompts import PromptBuilder
from pipeline.rices import check_encoder, image_embedder, nearest_sets
from pipeline.splits import make_splits

log = logging.getLogger(__name__)


def evaluate(
    params_path: Path,
    runs: list[Path],
    metrics_path: Path,
    predictions_path: Path,
    overrides: list[str],
    results_dir: Path | None = None,
    allow_other_base: bool = False,
) -> dict:
    """Score the prompt methods of `evaluate.methods` and every trained run in `runs` (a run directory holding
    `method/`, named in the table by its folder's name) on the same queries; writes the outputs only when all
    of them are done. Under `torchrun` each rank generates a contiguous share of the queries; rank 0 gathers
    them in order, scores once and writes (the other ranks return None)."""
    params = load_params(params_path, overrides)
    ev = params.evaluate
    method_configs(params.methods)  # every section checked, as train checks its own
    here = world()
    device = rank_device(params.model.device, here)
    named = [(run_label(run), run) for run in runs]  # each run's row, by its folder's name
    labels = list(ev.methods) + [label for label, _ in named]
    if not labels or len(set(labels)) != len(labels):
        raise MimicError(
            f"methods to evaluate: {labels or 'none'}; name each once (runs by their folder names)"
        )
    check_model(params.model.name, params.model.dtype, params.model.device)
    scored_as(params.data.eval)  # a table's metric name, before the model
    outputs = [metrics_path, latency_path(metrics_path), predictions_path, scores_plot(metrics_path)]
    if results_dir is not None:
        outputs += [results_dir / f"{label}.json" for label in labels]
    resolved = [path.resolve() for path in outputs]
    if len(set(resolved)) != len(resolved):  # e.g. --metrics X --predictions X: one would overwrite the other
        twice = next(path for path, r in zip(outputs, resolved) if resolved.count(r) > 1)
        raise MimicError(f"{twice} would be written twice: give --metrics, --predictions and --results apart")
    for path in outputs:  # every file, before any generation
        check_writable(path, "output file")
    for run in runs:
        check_method_base(
            run / "method", None, params.prompt, allow_other_base
        )  # the prompt, before the model
    splits = make_splits(params.data)  # data errors before the model is read
    if "rices" in labels:
        check_encoder(params.data.rices_encoder)
    loaded = load_model(params.model.name, params.model.dtype, device)
    trained = {}
    for label, run in named:
        trained[label] = load_method(
            run / "method", loaded.view, device=loaded.device
        )  # family and shape first
        check_method_base(run / "method", weights_fingerprint(loaded.model), None, allow_other_base)
    builder = PromptBuilder.for_model(loaded, params.prompt)
    queries = splits.eval
    mine = share(len(queries), here)
    nearest = None
    if "rices" in labels:  # the same embeddings on every rank: each embeds all queries and the support set
        embed = image_embedder(loaded, params.data.rices_encoder, loaded.device)
        nearest = nearest_sets(queries, splits.support, ev.k, 1, embed)
    prompts = {
        label: GenerationPrompts(
            builder, demonstrations(label, splits, ev, mine, nearest), [queries[n] for n in mine]
        )
        for label in labels
    }
    generated = interleaved(loaded.model, builder, prompts, trained, ev, params.data.workers)
    answers, seconds, tokens = merge(gather(generated, here))
    if not here.main:
        return None
    kind = scored_as(params.data.eval)
    scored = {m: score(kind, queries, answers[m]) for m in labels}
    metric = next(iter(scored.values())).metric
    scored_on = {**params.data.eval, "queries": len(queries), "split_seed": params.data.seed}
    where = ", ".join(f"{k}={v}" for k, v in scored_on.items() if v is not None)
    report = {
        # what was scored, in one line (one column in `dvc exp show`)
        "about": f"{metric} of {params.model.name} on {where}; runs {', '.join(map(str, runs)) or 'none'}",
        "metric": metric,
        "score": {m: round(s.value, 4) for m, s in scored.items()},
        **({"captions": {m: s.extra for m, s in scored.items()}} if kind == "coco_karpathy" else {}),
    }
    latency_extra = {
        "model": params.model.name,
        "data": scored_on,
        "runs": {label: str(run) for label, run in named},
        "processes": here.size,
    }
    latency = {**latency_report(seconds, tokens, len(queries), ev), **latency_extra, "methods": labels}
    for label in labels:
        latency[label]["parameters"] = trained[label].num_parameters() if label in trained else 0
    rows = [{"id": q.id, "question": q.question, "answers": list(q.answers)} for q in queries]
    for method, result in scored.items():
        for row, answer, value in zip(rows, answers[method], result.per_item):
            row[method] = {"prediction": answer, "score": value}
    if results_dir is not None:
        for method in labels:
            text = json.dumps(
                official_results(params.data.eval["kind"], queries, answers[method]), allow_nan=False
            )
            write_text_atomic(results_dir / f"{method}.json", text + "\n")
    write_text_atomic(
        predictions_path, "".join(json.dumps(r, sort_keys=True, allow_nan=False) + "\n" for r in rows)
    )
    write_text_atomic(latency_path(metrics_path), json.dumps(latency, indent=2, sort_keys=True) + "\n")
    method_scores(report["score"], report["metric"], scores_plot(metrics_path))
    write_text_atomic(metrics_path, json.dumps(report, indent=2, sort_keys=True, allow_nan=False) + "\n")
    return {**report, "latency": latency}


def run_label(run: Path) -> str:
    """A run's row in the table: its folder's name (runs/seed0/mimic -> mimic), refused where it would name
    another method than the one trained there (a LIVE run in runs/mimic would read as MimIC's result)."""
    from pipeline.methods import PROMPT_METHODS, TRAINED
    from pipeline.methods.io import read_method_config

    label = run.resolve().name
    if not (run / "method").is_dir():
        raise MimicError(f"no trained method in {run}: train it with `mimic train --run-dir {run}` first")
    stored = read_method_config(run / "method").get("method")
    if label in PROMPT_METHODS:  # its row would get demonstrations, and the speed-up would read it as ICL
        raise MimicError(
            f"{run} is named after the prompt method {label!r}: move the run to a folder named after its "
            f"method (e.g. {run.resolve().parent / str(stored)})"
        )
    if label in TRAINED and stored != label:
        raise MimicError(
            f"{run} holds a trained {stored!r} method, but its folder's name, the label of its row, is the method "
            f"{label!r}: move it to a folder named after it (e.g. {run.resolve().parent / str(stored)})"
        )
    return label


def demonstrations(label: str, splits, ev, mine, nearest=None) -> list[list]:
    """Each of this rank's queries' demonstrations under `label`: k random support items for icl, the k most
    similar images' items for rices, none for zero-shot and trained methods. The same on every rank."""
    if label == "rices":
        return [[splits.support[i] for i in nearest[n][0]] for n in mine]
    if label != "icl":
        return [[] for _ in mine]
    icd = sample_icd_sets([q.id for q in splits.eval], splits.support, ev.k, 1, ev.seed)
    return [[splits.support[i] for i in icd[n][0]] for n in mine]


def merge(shares: list[tuple[dict, dict, dict]]) -> tuple[dict, dict, dict]:
    """The ranks' (answers, seconds, tokens) joined in rank order: the queries' order."""
    joined = ({}, {}, {})
    for share_ in shares:
        for total, part in zip(joined, share_):
            for method, values in part.items():
                total.setdefault(method, []).extend(values)
    return joined


def interleaved(model, builder, prompts: dict, trained: dict, ev, workers: int = 0):
    """Generate every method's answers chunk by chunk of `ev.batch_size` queries, the methods' order rotating
    from chunk to chunk, after one untimed warm-up chunk per method; `ev.repeats` passes are timed (answers come
    from the first). The turns' prompts are built `workers` turns at a time by as many threads, between the
    timed generations, never during them (0: each when its turn comes). Returns answers, per-chunk (seconds,
    queries) and prompt tokens per method."""
    methods = list(prompts)
    n = len(next(iter(prompts.values())))
    chunks = [(first, min(first + ev.batch_size, n)) for first in range(0, n, ev.batch_size)]
    answers = {m: [] for m in methods}
    seconds = {m: [] for m in methods}
    tokens = {m: [] for m in methods}
    if not chunks:  # a rank without queries (more ranks than queries)
        return answers, seconds, tokens
    # warm-up: first calls pay for allocations and lazy set-up; then (repeat, chunk, method) in rotating order
    order = [(None, 0, method) for method in methods] + [
        (r, c, method)
        for r in range(ev.repeats)
        for c in range(len(chunks))
        for method in methods[c % len(methods) :] + methods[: c % len(methods)]
    ]

    def prepare(t: int) -> list:
        _, c, method = order[t]
        first, last = chunks[c]
        return prompts[method][first:last]

    built = in_waves(prepare, len(order), workers)  # never built while a turn is timed
    bar = tqdm(total=len(order) - len(methods), desc="evaluate", unit="turn")
    with contextlib.closing(built), bar:  # closed: an error leaves no thread building
        for (r, _, method), segments in zip(order, built, strict=True):
            attached = trained[method].attach(model) if method in trained else contextlib.nullcontext()
            with attached:  # one method on the model at a time
                out = generate_answers(
                    model,
                    builder,
                    segments,
                    ev.batch_size,
                    ev.num_beams,
                    ev.max_new_tokens,
                    desc="warm-up" if r is None else method,
                    max_batch_tokens=ev.max_batch_tokens,
                    progress=False,
                )
            if r is None:
                continue
            seconds[method].append((out.seconds, len(segments)))  # (seconds, queries) of the chunk
            if r == 0:  # later repeats only time the same generation again
                answers[method] += out.answers
                tokens[method] += out.prompt_tokens
            bar.update()
    return answers, seconds, tokens


def scores_plot(metrics_path: Path) -> Path:
    return metrics_path.with_name(metrics_path.stem + "_scores.png")


def latency_path(metrics_path: Path) -> Path:
    return metrics_path.with_name(metrics_path.stem + "_latency.json")


def latency_report(seconds: dict, tokens: dict, n: int, ev) -> dict:
    """Per method: ms per sample over all queries, and the quartiles of the chunks' ms per sample (the spread
    between chunks of one run, the methods timed in turn on each chunk); prompt tokens per sample; MimIC's
    speed-up over ICL."""
    report = {}
    for method, per_chunk in seconds.items():
        ms = [1000 * s / count for s, count in per_chunk]  # each chunk's ms per sample
        # inclusive: quartiles within the chunks' range (the default extrapolates past it for few chunks)
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else (ms[0],) * 3
        report[method] = {
            # all generation time over all queries and repeats
            "ms_per_sample": round(1000 * sum(s for s, _ in per_chunk) / (n * ev.repeats), 3),
            "ms_per_sample_p25": round(q1, 3),
            "ms_per_sample_p75": round(q3, 3),
            "prompt_tokens_per_sample": round(sum(tokens[method]) / n, 2),
        }
    if "icl" in report and "mimic" in report:  # the paper's headline
        report["mimic_speedup_over_icl"] = round(
            report["icl"]["ms_per_sample"] / report["mimic"]["ms_per_sample"], 3
        )
    chunks = len(next(iter(seconds.values())))
    report["settings"] = {"batch_size": ev.batch_size, "num_beams": ev.num_beams, "repeats": ev.repeats}
    report["settings"]["timed_chunks"] = chunks
    return report


def read_report(metrics_path: Path) -> dict:
    """A written evaluation (metrics and latency JSON) as `evaluate` returns it."""
    try:
        report = json.loads(Path(metrics_path).read_text())
        return {**report, "latency": json.loads(latency_path(Path(metrics_path)).read_text())}
    except (OSError, json.JSONDecodeError) as err:
        raise MimicError(f"cannot read the evaluation {metrics_path}: {err}") from err


def format_report(report: dict) -> str:
    """The terminal table: score, latency (with its spread) and prompt length per method."""
    latency = report["latency"]
    metric = report["metric"]
    lines = []
    if "mimic_speedup_over_icl" in latency:
        speedup = latency["mimic_speedup_over_icl"]
        lines.append(f"MimIC (no demonstrations) is {speedup:.2f}x faster per sample than ICL")
    head = f"{'method':<18} {metric:>14} {'parameters':>11} {'ms/sample':>10} {'(p25-p75)':>15} {'prompt tokens':>14}"
    lines.append(head)
    for method in latency.get(
        "methods", list(report["score"])
    ):  # prompt methods first, then the runs in order
        value, r = report["score"][method], latency[method]
        spread = f"{r['ms_per_sample_p25']:.2f}-{r['ms_per_sample_p75']:.2f}"
        lines.append(
            f"{method:<18} {value:>14.2f} {r.get('parameters', 0):>11,} {r['ms_per_sample']:>10.2f} {spread:>15} "
            f"{r['prompt_tokens_per_sample']:>14.1f}"
        )
    return "\n".join(lines)
