"""PNG figures that render offline (DVC shows image plots as they are): training curves, score per method."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402

COLOURS = {
    "loss": "#1f77b4",
    "ce": "#d62728",
    "align": "#2ca02c",
    "kl": "#9467bd",
}  # one distinct colour per component
STYLES = {
    "loss": ("-", 2.4),
    "ce": (":", 1.6),
    "align": ("--", 1.4),
    "kl": ("-.", 1.4),
}  # loss drawn wide: align runs close to it


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


def training_curves(rows: list[dict], path: Path, title: str = "training") -> None:
    """Total loss and the method's loss terms (CE, alignment, KL) per step (log scale), epoch boundaries dotted.
    A term that is zero throughout (not in the method's objective) is left out."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    steps = [r["step"] for r in rows]
    used = {k: c for k, c in COLOURS.items() if k in rows[0] and any(r[k] != 0 for r in rows)}
    for key, colour in used.items():
        style, width = STYLES[key]
        ax.plot(steps, [r[key] for r in rows], label=key, color=colour, linestyle=style, linewidth=width)
    for r, previous in zip(rows[1:], rows):
        if r["epoch"] != previous["epoch"]:
            ax.axvline(r["step"] - 0.5, color="#999999", linestyle=":", linewidth=0.8)
    if all(r[k] > 0 for r in rows for k in used):
        ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.legend(frameon=False)
    _save(fig, path)


def layer_curve(rows: list[dict], path: Path, title: str) -> None:
    """A fitted method's validation cross-entropy for each candidate layer."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot([r["layer"] for r in rows], [r["validation_ce"] for r in rows], marker="o", color=COLOURS["ce"])
    ax.set(xlabel="decoder layer", ylabel="validation answer CE", title=title)
    _save(fig, path)


def method_scores(scores: dict[str, float], metric: str, path: Path) -> None:
    """One bar per method, its score written on it."""
    fig, ax = plt.subplots(figsize=(1.4 + 1.1 * len(scores), 3.4))
    names = list(scores)
    bars = ax.bar(names, [scores[n] for n in names], color=plt.cm.tab10.colors[: len(names)])
    for bar, name in zip(bars, names):
        ax.annotate(f"{scores[name]:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", fontsize=9)  # fmt: skip
    ax.set(ylabel=metric, ylim=(0, max(100.0, *scores.values()) * 1.08), title="score per method")
    _save(fig, path)


def interval_scores(summary: dict, path: Path) -> None:
    """One bar per method at its mean over the seeds, the 95% interval as an error bar, each seed a dot."""
    rows = summary["detail"]
    names = list(rows)
    fig, ax = plt.subplots(figsize=(1.4 + 1.1 * len(names), 3.6))
    means = [rows[n]["mean"] for n in names]
    ax.bar(
        names,
        means,
        yerr=[rows[n]["ci95"] for n in names],
        capsize=4,
        color=plt.cm.tab10.colors[: len(names)],
    )
    for i, name in enumerate(names):
        ax.scatter([i] * len(rows[name]["seeds"]), rows[name]["seeds"], color="black", s=8, zorder=3)
    top = max([100.0, *(rows[n]["high"] for n in names)])
    ax.set(
        ylabel=summary["metric"],
        ylim=(0, top * 1.05),
        title=f"mean and 95% interval over {len(summary['seeds'])} seeds",
    )
    ax.tick_params(axis="x", labelrotation=30)
    _save(fig, path)


def curve(result: dict, series: list[tuple[str, str]], xlabel: str, path: Path, keys=None, line=None) -> None:
    """Accuracy curves of `mimic curves`: each (series, label) of `result["points"]` as its means with the 95%
    intervals as error bars, x the points' keys (restricted to `keys`); `line` = (series, key, label) draws that
    one point as a horizontal line with its interval as a band."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    points = result["points"]
    for (name, label), colour in zip(series, plt.cm.tab10.colors):
        xs = sorted((x for x in points[name] if keys is None or x in keys), key=int)  # JSON keys are strings
        rows = [points[name][x] for x in xs]
        ax.errorbar([int(x) for x in xs], [r["mean"] for r in rows], yerr=[r["ci95"] for r in rows], marker="o",
                    capsize=3, label=label, color=colour)  # fmt: skip
    if line is not None:
        name, key, label = line
        row = points[name][key]
        ax.axhline(row["mean"], color="#555555", linestyle="--", label=label)
        ax.axhspan(row["low"], row["high"], color="#555555", alpha=0.15)
    if xlabel == "training queries":
        ax.set_xscale("log", base=2)
    ticks = sorted({int(x) for name, _ in series for x in points[name] if keys is None or x in keys})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set(
        xlabel=xlabel,
        ylabel=result["metric"],
        ylim=(0, 100),
        title=f"mean and 95% interval over {len(result['seeds'])} seeds",
    )
    ax.legend(frameon=False)
    _save(fig, path)
