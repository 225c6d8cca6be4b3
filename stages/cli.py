"""The `mimic` command line: argument parsing only; each command imports its stage recipe when it runs
(so `mimic score` and `mimic --help` do not pay for importing torch and transformers)."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import typer

from pipeline.errors import MimicError
from stages import score

app = typer.Typer(
    help="MimIC: replace in-context demonstrations with learned attention shifts.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(score.app, name="score")

PARAMS = typer.Option(Path("params.yaml"), help="Parameters file (one section per stage).")
SET = typer.Option(
    [], "--set", "-s", help="Override a parameter by name, e.g. -s methods.mimic.lr=0.01 (repeatable)."
)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not verbose:  # transformers' own weight-loading bars and warnings would bury our one-line errors
        import os

        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


@app.command("extract")
def extract_command(
    out: Path = typer.Option(
        Path("cache/teacher.zarr"), help="Zarr store to write; an interrupted one is resumed."
    ),
    replace: bool = typer.Option(
        False, help="Replace a store written with other parameters instead of refusing."
    ),
    params: Path = PARAMS,
    set_: list[str] = SET,
) -> None:
    """Run the ICL teacher once and cache its per-layer query states (reads model, data, prompt, extract)."""
    from stages.extract import extract

    stats = extract(params, out, set_, replace=replace)
    typer.echo(
        f"{out}: {stats['samples']} samples, {stats['bytes_on_disk'] / 2**20:.2f} MiB on disk, "
        f"compression {stats['compression_ratio']:.2f}x"
    )


@app.command("train")
def train_command(
    cache: Path = typer.Option(Path("cache/teacher.zarr"), help="Teacher store written by `mimic extract`."),
    run_dir: Path | None = typer.Option(
        None,
        "--run-dir",
        help="Checkpoints, log and the trained method (<run-dir>/method); default runs/<train.method>.",
    ),
    online: bool = typer.Option(False, help="Reference mode: run the teacher at every step, no cache."),
    replace: bool = typer.Option(
        False, help="Discard a checkpoint of another run in --run-dir instead of refusing (DVC passes it)."
    ),
    params: Path = PARAMS,
    set_: list[str] = SET,
) -> None:
    """Train `train.method` from the cached teacher (reads model, data, prompt, extract, train, methods)."""
    from pipeline.config import load_params
    from stages.train import train

    if run_dir is None:  # named after the method: `mimic evaluate` labels a run by its folder's name
        run_dir = Path("runs") / load_params(params, set_).train.method
    summary = train(params, None if online else cache, run_dir, set_, replace=replace)
    if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 reports
        return
    if summary.get("fitted"):  # tv, fv: no steps, a layer chosen on the validation queries
        typer.echo(
            f"{run_dir / 'method'}: {summary['parameters']:,} parameters, layer {summary['layer']} chosen on the "
            f"validation queries (CE {summary['last_loss']:.4g}; the worst layer {summary['first_loss']:.4g})"
        )
        return
    typer.echo(
        f"{run_dir / 'method'}: {summary['parameters']:,} parameters, loss {summary['first_loss']:.4g} -> "
        f"{summary['last_loss']:.4g} (epoch means) in {summary['steps']} steps"
    )


@app.command("evaluate")
def evaluate_command(
    run: list[Path] = typer.Option(
        [], "--run-dir", help="A trained run directory (what `mimic train --run-dir` wrote); repeatable."
    ),
    run_root: Path | None = typer.Option(
        None,
        help="Evaluate every method of params.yaml `trained`, as <run-root>/<name> (what dvc.yaml does).",
    ),
    metrics: Path = typer.Option(Path("metrics/evaluate.json"), help="Metrics JSON to write."),
    predictions: Path = typer.Option(
        Path("metrics/predictions.jsonl"), help="Per-sample predictions to write."
    ),
    results: Path | None = typer.Option(
        None, help="Folder for each method's predictions in the official format (VQA, COCO results)."
    ),
    allow_other_base: bool = typer.Option(
        False, help="Apply a method trained on other weights or with another prompt template (warns)."
    ),
    params: Path = PARAMS,
    set_: list[str] = SET,
) -> None:
    """Compare the prompt methods and trained runs on held-out queries (reads model, data, prompt, evaluate,
    runs). Also writes <metrics>_latency.json beside the metrics."""
    from pipeline.config import load_params
    from stages.evaluate import evaluate, format_report

    runs = list(run)
    if run_root is not None:
        runs += [run_root / name for name in load_params(params, set_).trained]
    report = evaluate(params, runs, metrics, predictions, set_, results, allow_other_base)
    if report is not None:  # rank 0 of several, or the only process
        typer.echo(format_report(report))


@app.command("summarize")
def summarize_command(
    root: Path = typer.Option(
        Path("metrics/seeds"), help="Folder of the seeds' evaluations (seed<s>/evaluate.json)."
    ),
    out: Path = typer.Option(
        Path("metrics/summary.json"), help="Summary JSON; its .md table and .png beside it."
    ),
    params: Path = PARAMS,
    set_: list[str] = SET,
) -> None:
    """Each method's mean score and 95% interval over the seeds of params.yaml `seeds` (reads seeds)."""
    from stages.summarize import summarize

    typer.echo(summarize(params, root, out, set_)["table"])


@app.command("curves")
def curves_command(
    out: Path = typer.Option(Path("plots"), help="Folder for the two PNG curves and curves.json."),
    work: Path = typer.Option(Path("cache/curves"), help="Teacher caches, runs and evaluations (reused)."),
    shots: str = typer.Option("0,1,2,4,8", help="Demonstration counts k, comma-separated."),
    queries: str = typer.Option("25,50,100,200,400", help="Training query counts, comma-separated."),
    params: Path = PARAMS,
    set_: list[str] = SET,
) -> None:
    """Accuracy vs shots (ICL; MimIC from a k-shot teacher) and vs training queries (MimIC; ICL as a line), each
    point over the seeds of params.yaml `seeds` (reads every section)."""
    from stages.curves import curves

    def numbers(text: str, option: str) -> list[int]:
        try:
            return [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise MimicError(f"{option} {text!r}: give whole numbers separated by commas") from None

    result = curves(params, out, work, numbers(shots, "--shots"), numbers(queries, "--queries"), set_)
    for series, by_x in result["points"].items():
        line = ", ".join(f"{x}: {p['mean']:.1f} +- {p['ci95']:.1f}" for x, p in by_x.items())
        typer.echo(f"{series}: {line}")
    typer.echo(f"curves written to {out}")


@app.command("report")
def report_command(
    metrics: Path = typer.Argument(
        Path("metrics/evaluate.json"), help="Metrics JSON written by `mimic evaluate`."
    ),
) -> None:
    """Print the per-method table of an evaluation (score, latency and its spread, prompt tokens)."""
    from stages.evaluate import format_report, read_report

    typer.echo(format_report(read_report(metrics)))


class _Interrupted(BaseException):
    """Ctrl-C, raised past typer (which turns a KeyboardInterrupt into a silent exit 130)."""


def _interrupt(signum, frame) -> None:
    raise _Interrupted


def main() -> None:
    """Entry point of the console script: a MimicError becomes one line on stderr and exit code 2; Ctrl-C one
    line and exit code 130."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where the caller ignores it (`&`)
        signal.signal(signal.SIGINT, _interrupt)
    try:
        app()
    except MimicError as err:
        typer.echo(f"mimic: error: {err}", err=True)
        sys.exit(2)
    except (ImportError, RuntimeError) as err:
        if "torchvision" not in f"{err!r} {err.__cause__!r} {err.__context__!r}":
            raise
        # a torchvision built for another torch makes transformers' image classes fail to import
        reason = " ".join(str(err).split())[:200]
        typer.echo(
            f"mimic: error: torchvision is installed but cannot be imported with this torch ({reason}); "
            "uninstall it (`pip uninstall torchvision`: the pipeline does not need it) or install the build "
            "matching torch",
            err=True,
        )
        sys.exit(2)
    except (KeyboardInterrupt, _Interrupted):
        typer.echo(
            "mimic: interrupted (extract and train resume where they stopped when run again)", err=True
        )
        sys.exit(130)


if __name__ == "__main__":
    main()
