"""The report's charts: confusion matrix, reliability diagram, learning curve, accuracy against training time.

Every public function takes lists, arrays and numbers (no pipeline objects), writes one PNG and closes its
figure. The `_..._figure` helpers return the figure unsaved, so tests can measure what was drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, LogLocator, NullFormatter, NullLocator, PercentFormatter

from pipeline.results.label_placement import Mark, frame, place_labels, short
from pipeline.results.metrics import calibration_bins
from pipeline.results.png import DPI, save_png

CELL_NUMBERS_MAX_CLASSES = 25  # above this many classes, the confusion matrix shows colours only
STRATEGY_COLOURS = {"feature_extraction": "tab:blue", "fine_tuning": "tab:red"}
STRATEGY_NAMES = {"feature_extraction": "feature extraction (head on frozen features)", "fine_tuning": "fine-tuning"}


# --- confusion matrix -------------------------------------------------------------------------------------


def confusion_counts(actual: Sequence[str], predicted: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """Counts [C, C]: row = true class, column = predicted class, in the order of `classes`."""
    if len(actual) != len(predicted):
        raise ValueError(f"{len(actual)} true labels but {len(predicted)} predictions")
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({str(name) for name in [*actual, *predicted] if name not in index})
    if unknown:
        raise ValueError(f"labels not among the classes: {', '.join(unknown[:5])}")
    counts = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(counts, ([index[a] for a in actual], [index[p] for p in predicted]), 1)
    return counts


def _row_shares(counts: np.ndarray) -> np.ndarray:
    """Each row divided by its total (a class without images stays 0): the colour of the matrix."""
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)


def _confusion_figure(actual: Sequence[str], predicted: Sequence[str], classes: Sequence[str], title: str) -> Figure:
    """The confusion matrix: counts in the cells, colour = share of the true class."""
    counts = confusion_counts(actual, predicted, classes)
    n = len(classes)
    side = float(np.clip(2.4 + 0.34 * n, 4.2, 12.0))
    fig, ax = plt.subplots(figsize=(side + 1.2, side), layout="constrained")
    image = ax.imshow(_row_shares(counts), cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, shrink=0.8, format=PercentFormatter(1.0)).set_label("share of the true class")
    if n <= CELL_NUMBERS_MAX_CLASSES:
        _cell_numbers(ax, counts)
    tick_size = float(np.clip(0.55 * side * 0.75 * 72 / max(n, 1), 5, 10))  # type fills about half a cell
    rotate = max((len(str(c)) for c in classes), default=0) * n > 36
    ax.set_xticks(range(n), [str(c) for c in classes], fontsize=tick_size)
    ax.set_yticks(range(n), [str(c) for c in classes], fontsize=tick_size)
    if rotate:
        plt.setp(ax.get_xticklabels(), rotation=45, ha="right", rotation_mode="anchor")
    ax.set(xlabel="predicted class", ylabel="true class")
    correct = int(np.trace(counts))
    total = int(counts.sum())
    accuracy = correct / total if total else float("nan")
    ax.set_title(f"{title}\naccuracy {accuracy:.1%} ({correct}/{total})")
    return fig


def _cell_numbers(ax: Axes, counts: np.ndarray) -> None:
    """Write each count in its cell, white on dark cells, black on light ones."""
    shares = _row_shares(counts)
    size = float(np.clip(13 - 0.3 * len(counts), 6, 11))
    for (i, j), count in np.ndenumerate(counts):
        colour = "white" if shares[i, j] > 0.55 else ("black" if count else "0.6")  # zeros recede
        ax.text(j, i, str(count), ha="center", va="center", color=colour, fontsize=size)


def confusion_png(
    actual: Sequence[str], predicted: Sequence[str], classes: Sequence[str], title: str, path: Path
) -> None:
    """Write the confusion matrix of `actual` against `predicted` (class names) to `path`."""
    save_png(_confusion_figure(actual, predicted, classes, title), path)


# --- reliability diagram ----------------------------------------------------------------------------------


def _reliability_figure(confidence: np.ndarray, correct: np.ndarray, ece: float, n_bins: int, title: str) -> Figure:
    """Accuracy per confidence bin as bars over the diagonal, and below it the images per bin."""
    counts, accuracy, mean_confidence = calibration_bins(confidence, correct, n_bins)
    width = 1.0 / n_bins
    centres = (np.arange(n_bins) + 0.5) * width
    full = counts > 0  # an empty bin is drawn as nothing, not as zero accuracy
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.6, 5.6), sharex=True, height_ratios=(3, 1), layout="constrained")
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    top.bar(
        centres[full], accuracy[full], width=width, color="tab:blue", alpha=0.75, edgecolor="white", label="accuracy"
    )
    top.plot(
        centres[full], mean_confidence[full], linestyle="none", marker="_", markersize=14, markeredgewidth=2.5,
        color="tab:red", label="mean confidence",
    )  # fmt: skip
    top.set(xlim=(0, 1), ylim=(0, 1.02), ylabel="accuracy in the bin", title=f"{title}\nECE {ece:.3f} ({n_bins} bins)")
    top.legend(loc="upper left", fontsize=9)
    bottom.bar(centres[full], counts[full], width=width, color="grey", edgecolor="white")
    bottom.set(xlabel="confidence (top-class probability)", ylabel="images")
    bottom.set_ylim(0, max(1, int(counts.max(initial=0))) * 1.15)
    return fig


def reliability_png(
    confidence: np.ndarray, correct: np.ndarray, ece: float, n_bins: int, title: str, path: Path
) -> None:
    """Write the reliability diagram of top-class `confidence` against `correct` (bools) to `path`."""
    save_png(_reliability_figure(confidence, correct, ece, n_bins, title), path)


# --- learning curve ---------------------------------------------------------------------------------------


def _learning_curve_figure(
    curve: list[dict], curve_head: str, tuned_curve: list[dict] | None, tuned_accuracy: float | None
) -> Figure:
    """Test accuracy against training images per class: the head's k-shot mean over seeds with its 95% t-interval
    band and each seed's run (pipeline.results.few_shot), the head as trained on every image, and fine-tuning."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    shots = [p for p in curve if p["label"] != "all"]
    every = [p for p in curve if p["label"] == "all"]
    x = np.array([p["per_class"] for p in shots], dtype=float)
    y = np.array([p["accuracy"] for p in shots], dtype=float)
    banded = [p for p in shots if p.get("low") is not None]
    values = [*y]
    if banded:
        seeds = max(p["seeds"] for p in banded)
        low, high = [p["low"] for p in banded], [p["high"] for p in banded]
        ax.fill_between(
            [p["per_class"] for p in banded], low, high, color="tab:blue", alpha=0.2, linewidth=0,
            label=f"{curve_head}: 95% t-interval over {seeds} seeds",
        )  # fmt: skip
        values += [*low, *high]
    runs = [(p["per_class"], r["accuracy"]) for p in shots if len(p.get("runs", [])) > 1 for r in p["runs"]]
    if runs:
        ax.scatter(*zip(*runs, strict=True), s=12, color="tab:blue", alpha=0.45, linewidths=0, label="each seed")
        values += [a for _, a in runs]
    if shots:
        ax.plot(x, y, marker="o", color="tab:blue", label=f"{curve_head}, k-shot (grid chosen on val shots): mean")
    for p in every:
        ax.plot(
            p["per_class"], p["accuracy"], marker="*", markersize=11, linestyle="none", color="tab:blue",
            label=f"{curve_head} as trained, all images",
        )  # fmt: skip
        values.append(p["accuracy"])
    ticks = [p["per_class"] for p in curve]
    if tuned_curve:
        tx = [p["per_class"] for p in tuned_curve]
        ax.plot(tx, [p["accuracy"] for p in tuned_curve], marker="s", color="tab:red", label="fine-tuned on the subset")
        ticks += tx
        values += [p["accuracy"] for p in tuned_curve]
    if tuned_accuracy is not None:
        ax.axhline(tuned_accuracy, color="tab:red", linestyle="--", linewidth=1.2, label="fine-tuned, all images")
        values.append(tuned_accuracy)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(sorted(set(ticks))))
    ax.xaxis.set_minor_locator(NullLocator())
    every_x = {p["per_class"] for p in every} - set(x)  # "all" names its tick unless a k-shot point shares it
    ax.xaxis.set_major_formatter(lambda v, _: f"all ({v:g})" if v in every_x else f"{v:g}")
    low, high = min(values, default=0.0), max(values, default=1.0)
    pad = max(0.02, 0.06 * (high - low))
    ax.set_ylim(max(0.0, low - pad), min(1.0, high) + pad)
    ax.set(xlabel="training images per class", ylabel="test accuracy", title="Learning curve (few-shot protocol)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def learning_curve_png(
    curve: list[dict],
    curve_head: str,
    path: Path,
    tuned_curve: list[dict] | None = None,
    tuned_accuracy: float | None = None,
) -> None:
    """Write the learning curve of `curve_head` (and of fine-tuning, when given) to `path`."""
    save_png(_learning_curve_figure(curve, curve_head, tuned_curve, tuned_accuracy), path)


# --- accuracy against training time -----------------------------------------------------------------------


def _accuracy_vs_time_figure(points: list[dict]) -> Figure:
    """Test accuracy (with its 95% interval) against training seconds; labels placed without overlap."""
    fig = plt.figure(figsize=(7.2, 4.6), dpi=DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    frame(fig, ax)
    seconds = np.array([max(float(p["seconds"]), 1e-3) for p in points])
    accuracy = np.array([float(p["accuracy"]) for p in points])
    low = np.minimum([float(p["low"]) for p in points], accuracy)
    high = np.maximum([float(p["high"]) for p in points], accuracy)
    for strategy in dict.fromkeys(p["strategy"] for p in points):
        mine = [i for i, p in enumerate(points) if p["strategy"] == strategy]
        ax.errorbar(
            seconds[mine], accuracy[mine], yerr=[accuracy[mine] - low[mine], high[mine] - accuracy[mine]],
            fmt="o", capsize=3, markersize=5, elinewidth=1.2, color=STRATEGY_COLOURS.get(strategy, "tab:grey"),
            label=STRATEGY_NAMES.get(strategy, strategy),
        )  # fmt: skip
    _set_time_limits(ax, seconds, [*low, *high])
    ax.set(
        xlabel="training seconds (heads: extraction + fit)", ylabel="test accuracy (95% interval)",
        title="Accuracy against training time",
    )  # fmt: skip
    ax.grid(alpha=0.3, which="both")
    fig.legend(loc="lower center", ncol=2, frameon=False, fontsize=9)
    marks = [Mark(short(str(p["name"])), seconds[i], accuracy[i], low[i], high[i]) for i, p in enumerate(points)]
    place_labels(fig, ax, marks)
    return fig


def _set_time_limits(ax: Axes, seconds: np.ndarray, bounds: list[float]) -> None:
    """Log x with some room on both sides; y spanning every interval."""
    lo, hi = (np.log10(seconds.min()), np.log10(seconds.max())) if seconds.size else (0.0, 0.0)
    span = max(hi - lo, 0.5)
    ax.set_xscale("log")
    ax.set_xlim(10 ** (lo - 0.15 * span), 10 ** (hi + 0.15 * span))
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if span < 3 else (1.0,)))
    ax.xaxis.set_minor_locator(LogLocator(subs="auto"))
    ax.xaxis.set_major_formatter(_seconds)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ylo, yhi = min(bounds, default=0.0), max(bounds, default=1.0)
    pad = max(0.01, 0.06 * (yhi - ylo))
    ax.set_ylim(ylo - pad, yhi + pad)


def _seconds(value: float, _: int) -> str:
    """A tick of the time axis: plain numbers, powers of ten beyond them."""
    if 1e-3 <= value < 1e5:
        return f"{value:g}"
    return f"$10^{{{np.log10(value):.0f}}}$"


def accuracy_vs_time_png(points: list[dict], path: Path) -> None:
    """Write test accuracy against training seconds for every model (name, strategy, seconds, accuracy, low, high)."""
    save_png(_accuracy_vs_time_figure(points), path)
