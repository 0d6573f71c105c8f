"""The report's pictures: PNG files from plain data, readable offline and at a glance.

Every public function takes lists, arrays and numbers (no pipeline objects), writes one PNG and closes its
figure. The `_..._figure` helpers return the figure unsaved, so tests can measure what was drawn.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import numpy as np  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.font_manager import FontProperties  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from matplotlib.ticker import FixedLocator, LogLocator, NullFormatter, NullLocator, PercentFormatter  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from pipeline.core.io import atomic_path  # noqa: E402

DPI = 110
CELL_NUMBERS_MAX_CLASSES = 25  # above this many classes, the confusion matrix shows colours only
STRATEGY_COLOURS = {"feature_extraction": "tab:blue", "fine_tuning": "tab:red"}
STRATEGY_NAMES = {"feature_extraction": "feature extraction (head on frozen features)", "fine_tuning": "fine-tuning"}
LABEL_GAP_PX = 3.0  # vertical space between two stacked point labels
LABEL_OFFSET_PX = 9.0  # horizontal distance from a point to its label
LABEL_MAX_CHARS = 40  # longer point labels are shortened with an ellipsis
THUMB_CELL_IN = 2.3  # width of one grid cell, and the most height a thumbnail takes
THUMB_GAP_IN = 0.22  # between two cells of a row
THUMB_PAIR_GAP_IN = 0.06  # between the two thumbnails of a pair
THUMB_ROW_GAP_IN = 0.22  # between a row's captions and the next row's thumbnails
THUMB_MARGIN_IN = 0.15
THUMB_CAPTION_SIZE = 7.5
THUMB_CAPTION_MAX_LINES = 6  # longer captions end with an ellipsis
THUMB_MAX_CELLS = 40  # the caller passes the top ones; beyond this the title says how many were left out
THUMB_UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _save(fig: Figure, path: Path) -> None:
    """Write `fig` as a PNG at the module's resolution (atomically, creating the folder), and close it."""
    try:
        with atomic_path(Path(path)) as tmp:
            fig.savefig(tmp, dpi=DPI, format="png")
    finally:
        plt.close(fig)


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
    _save(_confusion_figure(actual, predicted, classes, title), path)


# --- reliability diagram ----------------------------------------------------------------------------------


def reliability_bins(
    confidence: np.ndarray, correct: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width bin: (count, accuracy, mean confidence); accuracy and confidence are NaN where empty.

    The bins of the project's ECE: bin k holds (k/n, (k+1)/n]; a confidence of exactly 0 joins the first.
    """
    confidence = np.asarray(confidence, dtype=float).ravel()
    correct = np.asarray(correct, dtype=float).ravel()
    if confidence.shape != correct.shape:
        raise ValueError(f"{confidence.size} confidences but {correct.size} correctness flags")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(bins, weights=correct, minlength=n_bins) / counts
        mean_confidence = np.bincount(bins, weights=confidence, minlength=n_bins) / counts
    return counts, accuracy, mean_confidence


def _reliability_figure(confidence: np.ndarray, correct: np.ndarray, ece: float, n_bins: int, title: str) -> Figure:
    """Accuracy per confidence bin as bars over the diagonal, and below it the images per bin."""
    counts, accuracy, mean_confidence = reliability_bins(confidence, correct, n_bins)
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
    _save(_reliability_figure(confidence, correct, ece, n_bins, title), path)


# --- learning curve ---------------------------------------------------------------------------------------


def _learning_curve_figure(
    curve: list[dict], curve_head: str, tuned_curve: list[dict] | None, tuned_accuracy: float | None
) -> Figure:
    """Test accuracy against training images per class: the head (± 1 std band) and fine-tuning."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    x = np.array([p["per_class"] for p in curve], dtype=float)
    y = np.array([p["accuracy"] for p in curve], dtype=float)
    s = np.array([p.get("std", 0.0) for p in curve], dtype=float)
    ax.fill_between(
        x, y - s, y + s, color="tab:blue", alpha=0.2, linewidth=0, label=f"{curve_head}: ± 1 std over seeds"
    )
    ax.plot(x, y, marker="o", color="tab:blue", label=f"{curve_head} on frozen features (mean over seeds)")
    ticks = list(x)
    if tuned_curve:
        tx = [p["per_class"] for p in tuned_curve]
        ax.plot(tx, [p["accuracy"] for p in tuned_curve], marker="s", color="tab:red", label="fine-tuned on the subset")
        ticks += tx
    if tuned_accuracy is not None:
        ax.axhline(tuned_accuracy, color="tab:red", linestyle="--", linewidth=1.2, label="fine-tuned, all images")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(sorted(set(ticks))))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(lambda v, _: f"{v:g}")
    values = [*(y - s), *(y + s), *([tuned_accuracy] if tuned_accuracy is not None else [])]
    values += [p["accuracy"] for p in tuned_curve or []]
    low, high = min(values, default=0.0), max(values, default=1.0)
    pad = max(0.02, 0.06 * (high - low))
    ax.set_ylim(max(0.0, low - pad), min(1.0, high) + pad)
    ax.set(xlabel="training images per class", ylabel="test accuracy", title="Learning curve")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8.5)
    return fig


def learning_curve_png(
    curve: list[dict],
    curve_head: str,
    path: Path,
    tuned_curve: list[dict] | None = None,
    tuned_accuracy: float | None = None,
) -> None:
    """Write the learning curve of `curve_head` (and of fine-tuning, when given) to `path`."""
    _save(_learning_curve_figure(curve, curve_head, tuned_curve, tuned_accuracy), path)


# --- accuracy against training time -----------------------------------------------------------------------


def _accuracy_vs_time_figure(points: list[dict]) -> Figure:
    """Test accuracy (with its 95% interval) against training seconds; labels placed without overlap."""
    fig = plt.figure(figsize=(7.2, 4.6), dpi=DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    _frame(fig, ax)
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
    marks = [_Mark(_short(str(p["name"])), seconds[i], accuracy[i], low[i], high[i]) for i, p in enumerate(points)]
    _place_labels(fig, ax, marks)
    return fig


def _frame(fig: Figure, ax: Axes) -> None:
    """A fixed layout, margins in inches (labels are placed in pixels, so the axes must not move afterwards)."""
    width, height = fig.get_size_inches()
    left, right, bottom, top = 0.8, 0.22, 0.97, 0.37
    ax.set_position((left / width, bottom / height, 1 - (left + right) / width, 1 - (bottom + top) / height))


def _short(name: str, limit: int = LABEL_MAX_CHARS) -> str:
    """The name, cut with an ellipsis beyond `limit` characters (the report's table has it whole)."""
    return name if len(name) <= limit else name[: limit - 1] + "…"


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


@dataclass(frozen=True)
class _Mark:
    """One point to label: its name, position (data) and error bar."""

    name: str
    x: float
    y: float
    low: float
    high: float


def _place_labels(fig: Figure, ax: Axes, marks: list[_Mark]) -> None:
    """Label every point, in columns beside crowded clusters with thin leader lines.

    First keep labels off every error bar; if that cannot fit, keep them off the markers only; then use
    smaller type; then make the figure taller.
    """
    xlim = ax.get_xlim()
    tries = [(9.0, True), (9.0, False), (8.0, False), (7.0, False), (6.0, False)]
    for _ in range(6):
        for size, avoid_bars in tries:
            for text in list(ax.texts):
                text.remove()
            ax.set_xlim(xlim)
            labels = [
                ax.text(m.x, m.y, m.name, fontsize=size, va="center", ha="left", gid="point-label") for m in marks
            ]
            _widen_for_labels(fig, ax, labels, marks)
            if _layout_labels(fig, ax, labels, marks, avoid_bars):
                return
        width, height = fig.get_size_inches()
        fig.set_size_inches(width, height * 1.4)
        _frame(fig, ax)


def _widen_for_labels(fig: Figure, ax: Axes, labels: list[Text], marks: list[_Mark]) -> None:
    """Stretch the log x axis to the right until each label fits right of its point (unless it is very wide)."""
    renderer = fig.canvas.get_renderer()
    width = ax.get_window_extent(renderer).width
    lo, hi = np.log10(ax.get_xlim())
    need = hi
    for label, mark in zip(labels, marks, strict=True):
        room = width - LABEL_OFFSET_PX - label.get_window_extent(renderer).width - 6
        if room > 0.4 * width:  # (x - lo) / (hi' - lo) * width + offset + label width <= width
            need = max(need, lo + (np.log10(mark.x) - lo) * width / room)
    ax.set_xlim(10**lo, 10**need)


def _layout_labels(fig: Figure, ax: Axes, labels: list[Text], marks: list[_Mark], avoid_bars: bool) -> bool:
    """Move `labels` to non-overlapping spots inside the axes and draw leaders; False if they cannot fit.

    Each label starts in a group of its own; groups whose labels collide with each other (or with another
    point's marker, or its error bar if `avoid_bars`) merge and are laid out again as one column, until
    nothing collides.
    """
    renderer = fig.canvas.get_renderer()
    box = ax.get_window_extent(renderer)
    sizes = [(e.width, e.height) for e in (t.get_window_extent(renderer) for t in labels)]
    anchors = [tuple(ax.transData.transform((m.x, m.y))) for m in marks]
    bars = [_obstacle(ax, m, avoid_bars) for m in marks]
    sides = [_side(px, w, box) for (px, _), (w, _) in zip(anchors, sizes, strict=True)]
    groups = [[i] for i in range(len(labels))]
    while True:
        lefts = _column_lefts(anchors, sizes, sides, groups, box)
        centres = np.array([py for _, py in anchors], dtype=float)
        for group in groups:
            placed = _stack(centres[group], np.array([sizes[i][1] for i in group]), box.y0 + 2, box.y1 - 2)
            if placed is None:
                return False
            centres[group] = placed
        rects = [(x, c - h / 2, x + w, c + h / 2) for x, c, (w, h) in zip(lefts, centres, sizes, strict=True)]
        merged = _merge_colliding(groups, rects, bars)
        if len(merged) == len(groups):
            break
        groups = merged
    to_data = ax.transData.inverted()
    for t, anchor, left, cy, (w, _), side in zip(labels, anchors, lefts, centres, sizes, sides, strict=True):
        t.set_position(to_data.transform((left, cy)))
        _leader(ax, anchor, (left - 1.5, cy) if side == "right" else (left + w + 1.5, cy))
    return True


def _obstacle(ax: Axes, mark: _Mark, whole_bar: bool) -> tuple[float, float, float, float]:
    """The pixels around a point that other labels keep off: its marker, or its whole error bar."""
    px, py = ax.transData.transform((mark.x, mark.y))
    if not whole_bar:
        return (px - 5, py - 5, px + 5, py + 5)
    low, high = ax.transData.transform([(mark.x, mark.low), (mark.x, mark.high)])[:, 1]
    return (px - 5, min(low, py - 5), px + 5, max(high, py + 5))


def _leader(ax: Axes, anchor: tuple[float, float], edge: tuple[float, float]) -> None:
    """A thin line from just beside the point to the label's edge (pixels), unless the label sits by its point."""
    (px, py), (ex, ey) = anchor, edge
    length = float(np.hypot(ex - px, ey - py))
    if abs(ey - py) < 2 and length < LABEL_OFFSET_PX + 2:
        return
    start = (px + 4 * (ex - px) / length, py + 4 * (ey - py) / length)
    (x0, y0), (x1, y1) = ax.transData.inverted().transform([start, edge])
    ax.plot([x0, x1], [y0, y1], color="0.45", linewidth=0.6, gid="leader")


def _side(px: float, width: float, box: Bbox) -> str:
    """Right of the point when the label fits there, else left of it."""
    return "right" if px + LABEL_OFFSET_PX + width <= box.x1 - 2 else "left"


def _column_lefts(anchors: list, sizes: list, sides: list[str], groups: list[list[int]], box: Bbox) -> list[float]:
    """Left pixel of each label: one aligned column per group and side, beyond all its points, inside the axes."""
    lefts = [0.0] * len(anchors)
    for group in groups:
        edge_r = max(anchors[i][0] for i in group) + LABEL_OFFSET_PX
        edge_l = min(anchors[i][0] for i in group) - LABEL_OFFSET_PX
        for i in group:
            if sides[i] == "right":
                lefts[i] = max(min(edge_r, box.x1 - 2 - sizes[i][0]), box.x0 + 2)
            else:
                lefts[i] = min(max(edge_l - sizes[i][0], box.x0 + 2), box.x1 - 2 - sizes[i][0])
    return lefts


def _merge_colliding(groups: list[list[int]], rects: list[tuple], bars: list[tuple]) -> list[list[int]]:
    """Join two groups when a label of one meets a label, or the error bar, of a point of the other."""
    owner = {i: g for g, members in enumerate(groups) for i in members}
    parent = list(range(len(groups)))

    def root(g: int) -> int:
        while parent[g] != g:
            g = parent[g]
        return g

    pad = LABEL_GAP_PX / 2 - 0.01
    for a in owner:
        for b in owner:
            if owner[a] != owner[b] and (_meet(rects[a], rects[b], pad) or _meet(rects[a], bars[b], 0.0)):
                parent[root(owner[a])] = root(owner[b])
    joined: dict[int, list[int]] = {}
    for g, members in enumerate(groups):
        joined.setdefault(root(g), []).extend(members)
    return [sorted(m) for m in joined.values()]


def _meet(a: tuple, b: tuple, pad: float) -> bool:
    """Whether rectangles (x0, y0, x1, y1) overlap once each grows by `pad` on every side."""
    return a[0] - pad < b[2] + pad and b[0] - pad < a[2] + pad and a[1] - pad < b[3] + pad and b[1] - pad < a[3] + pad


def _stack(wanted: np.ndarray, heights: np.ndarray, low: float, high: float) -> np.ndarray | None:
    """Vertical centres as near `wanted` as possible, no two boxes closer than the gap, inside [low, high].

    Keeps the order of `wanted`; None when the boxes are taller than the room.
    """
    order = np.argsort(-wanted, kind="stable")  # top to bottom
    h = heights[order]
    if h.sum() + LABEL_GAP_PX * (len(h) - 1) > high - low:
        return None
    blocks = [[k] for k in range(len(order))]  # merge neighbours that collide, each block centred on its wishes
    tops = _block_tops(blocks, wanted[order], h)
    while (b := _first_collision(blocks, tops, h)) is not None:
        blocks[b : b + 2] = [blocks[b] + blocks[b + 1]]
        tops = _block_tops(blocks, wanted[order], h)
    centres = np.empty(len(order))
    y = min(high, max(tops[0], low + h.sum() + LABEL_GAP_PX * (len(h) - 1)))
    for b, block in enumerate(blocks):  # top to bottom, clamped into [low, high] without new overlaps
        remaining = h[block[0] :].sum() + LABEL_GAP_PX * (len(h) - block[0] - 1)
        y = min(y, tops[b], high) if b else y
        y = max(y, low + remaining)
        for k in block:
            centres[order[k]] = y - h[k] / 2
            y -= h[k] + LABEL_GAP_PX
    return centres


def _first_collision(blocks: list[list[int]], tops: list[float], h: np.ndarray) -> int | None:
    """The first block (top to bottom) that reaches into the one below it, or None."""
    for b in range(len(blocks) - 1):
        if tops[b] - _block_height(blocks[b], h) < tops[b + 1] + LABEL_GAP_PX:
            return b
    return None


def _block_height(block: list[int], h: np.ndarray) -> float:
    """Height of labels stacked with the gap between them."""
    return float(h[block].sum() + LABEL_GAP_PX * (len(block) - 1))


def _block_tops(blocks: list[list[int]], wanted: np.ndarray, h: np.ndarray) -> list[float]:
    """Top of each block when it is centred on the mean of its members' wished centres."""
    return [float(wanted[b].mean() + _block_height(b, h) / 2) for b in blocks]


def accuracy_vs_time_png(points: list[dict], path: Path) -> None:
    """Write test accuracy against training seconds for every model (name, strategy, seconds, accuracy, low, high)."""
    _save(_accuracy_vs_time_figure(points), path)


# --- thumbnail grid ---------------------------------------------------------------------------------------


def _thumbnail_grid_figure(cells: list[dict], title: str, columns: int = 4) -> Figure:
    """Thumbnails (one image, or several side by side) in rows of `columns` cells, each captioned below."""
    if not cells:
        return _nothing_to_show_figure(title)
    shown = list(cells[:THUMB_MAX_CELLS])
    if len(cells) > len(shown):
        title = f"{title} (the first {len(shown)} of {len(cells)})"
    columns = max(1, min(int(columns), len(shown)))
    grid_width = columns * THUMB_CELL_IN + (columns - 1) * THUMB_GAP_IN
    fig = plt.figure(figsize=(max(grid_width + 2 * THUMB_MARGIN_IN, 4.5), 4.0), dpi=DPI)
    heading = _fitted_text(fig, title, 11.0, fig.get_figwidth() - 2 * THUMB_MARGIN_IN, 3, "title")
    captions = [
        _fitted_text(fig, str(c.get("caption", "")), THUMB_CAPTION_SIZE, THUMB_CELL_IN - 0.04, THUMB_CAPTION_MAX_LINES)
        for c in shown
    ]
    pictures = [_cell_pictures([Path(p) for p in c.get("images", [])]) for c in shown]
    _lay_out_grid(fig, heading, captions, pictures, columns)
    return fig


def _lay_out_grid(fig: Figure, heading: Text, captions: list[Text], pictures: list[list], columns: int) -> None:
    """Size the figure from its rows (thumbnail band + caption band each), then place title, pictures, captions."""
    renderer = fig.canvas.get_renderer()
    title_h = heading.get_window_extent(renderer).height / DPI
    caption_h = max(t.get_window_extent(renderer).height for t in captions) / DPI
    rows = [range(r, min(r + columns, len(pictures))) for r in range(0, len(pictures), columns)]
    bands = [max(_band_height(pictures[i]) for i in row) for row in rows]
    width = fig.get_figwidth()
    height = 2 * THUMB_MARGIN_IN + title_h + 0.12 + sum(bands) + len(rows) * (0.05 + caption_h + THUMB_ROW_GAP_IN)
    fig.set_size_inches(width, height)
    heading.set_position((0.5, 1 - THUMB_MARGIN_IN / height))
    left = (width - columns * THUMB_CELL_IN - (columns - 1) * THUMB_GAP_IN) / 2
    y = THUMB_MARGIN_IN + title_h + 0.12  # inches from the top
    for row, band in zip(rows, bands, strict=True):
        for k, i in enumerate(row):
            x = left + k * (THUMB_CELL_IN + THUMB_GAP_IN)
            _draw_cell(fig, pictures[i], (x, y, band))
            captions[i].set_position(((x + THUMB_CELL_IN / 2) / width, 1 - (y + band + 0.05) / height))
        y += band + 0.05 + caption_h + THUMB_ROW_GAP_IN


def _box_width(count: int) -> float:
    """Width in inches of each of `count` thumbnails sharing one cell."""
    count = max(1, count)
    return (THUMB_CELL_IN - (count - 1) * THUMB_PAIR_GAP_IN) / count


def _cell_pictures(images: list[Path]) -> list[np.ndarray | None]:
    """The cell's images as RGB arrays no larger than their boxes in pixels; None for one that cannot be read."""
    box = (round(_box_width(len(images)) * DPI), round(THUMB_CELL_IN * DPI))
    return [_thumbnail(path, box) for path in images] or [None]


def _thumbnail(path: Path, box: tuple[int, int]) -> np.ndarray | None:
    """The image upright (EXIF orientation) in RGB, shrunk to fit `box` (w, h pixels), never enlarged."""
    try:
        with Image.open(path) as image:
            image.draft(None, (max(box), max(box)))  # JPEG: decode at a reduced scale, still >= the box
            upright = ImageOps.exif_transpose(image).convert("RGB")
        upright.thumbnail(box, Image.Resampling.LANCZOS)
        return np.asarray(upright)
    except THUMB_UNREADABLE:
        return None


def _picture_size(picture: np.ndarray | None, box_width: float) -> tuple[float, float]:
    """Inches (w, h) of a picture fitted into `box_width` x THUMB_CELL_IN, aspect kept (4:3 for a placeholder)."""
    ratio = 0.75 if picture is None else picture.shape[0] / max(picture.shape[1], 1)
    if box_width * ratio <= THUMB_CELL_IN:
        return box_width, box_width * ratio
    return THUMB_CELL_IN / ratio, THUMB_CELL_IN


def _band_height(pictures: list[np.ndarray | None]) -> float:
    """Height of the thumbnail band a cell needs: its tallest picture."""
    return max(_picture_size(p, _box_width(len(pictures)))[1] for p in pictures)


def _draw_cell(fig: Figure, pictures: list[np.ndarray | None], where: tuple[float, float, float]) -> None:
    """Draw the pictures side by side in the band at (left, top, height) inches, centred, resting on the caption."""
    x, y, band = where
    width, height = fig.get_size_inches()
    box_w = _box_width(len(pictures))
    for j, picture in enumerate(pictures):
        w, h = _picture_size(picture, box_w)  # the axes hug the picture: no empty frame around it
        left, top = x + j * (box_w + THUMB_PAIR_GAP_IN) + (box_w - w) / 2, y + band - h  # on its caption
        ax = fig.add_axes((left / width, 1 - (top + h) / height, w / width, h / height), gid="thumbnail")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set(color="0.75", linewidth=0.6)
        if picture is None:
            ax.set_facecolor("0.85")
            ax.text(0.5, 0.5, "cannot open", ha="center", va="center", fontsize=8, color="0.3", transform=ax.transAxes)
        else:
            ax.imshow(picture, aspect="auto", interpolation="antialiased")


def _fitted_text(fig: Figure, text: str, size: float, width_in: float, max_lines: int, gid: str = "caption") -> Text:
    """A centred figure text, top-anchored, wrapped to `width_in` and cut to `max_lines` (placed later)."""
    renderer = fig.canvas.get_renderer()
    prop = FontProperties(size=size)
    limit = width_in * DPI

    def fits(line: str) -> bool:
        return renderer.get_text_width_height_descent(line, prop, ismath=False)[0] <= limit

    lines = [piece for line in (text.splitlines() or [""]) for piece in _wrap_line(line, fits)]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        kept = lines[-1].rstrip()
        while kept and not fits(kept + "…"):
            kept = kept[:-1]
        lines[-1] = kept + "…"
    return fig.text(
        0.5, 0.5, "\n".join(lines), fontproperties=prop, ha="center", va="top", multialignment="center",
        linespacing=1.25, parse_math=False, gid=gid,
    )  # fmt: skip


def _wrap_line(line: str, fits: Callable[[str], bool]) -> list[str]:
    """Greedy wrap at spaces and after slashes (paths); a word too wide for a line alone loses its middle."""
    pieces: list[str] = []
    current = ""
    for token in re.findall(r"\s+|[^\s/]*/|[^\s/]+", line):
        if fits((current + token).rstrip()):
            current += token
            continue
        if current.strip():
            pieces.append(current.rstrip())
        current = _squeeze(token.lstrip(), fits)
    if current.strip() or not pieces:
        pieces.append(current.rstrip())
    return pieces


def _squeeze(word: str, fits: Callable[[str], bool]) -> str:
    """The word itself if it fits, else its start and end joined by an ellipsis, as long as fits (names differ
    at both ends: a file's id at the start, its suffix at the end)."""
    if fits(word):
        return word
    low, high = 0, len(word) - 1  # characters kept: `low` always fits (an ellipsis alone), `high` never does
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(_ellipsis(word, middle)) else (low, middle)
    return _ellipsis(word, low)


def _ellipsis(word: str, keep: int) -> str:
    """`keep` characters of `word`: the first half and the last, joined by an ellipsis."""
    head = (keep + 1) // 2
    return word[:head] + "…" + word[len(word) - (keep - head) :]


def _nothing_to_show_figure(title: str) -> Figure:
    """A small figure with the title and 'nothing to show', so a report's link to it still opens."""
    fig = plt.figure(figsize=(4.5, 1.4), dpi=DPI)
    heading = _fitted_text(fig, title, 11.0, 4.5 - 2 * THUMB_MARGIN_IN, 2, "title")
    heading.set_position((0.5, 1 - THUMB_MARGIN_IN / 1.4))
    fig.text(0.5, 0.3, "nothing to show", ha="center", va="center", fontsize=10, color="0.4", style="italic")
    return fig


def thumbnail_grid_png(cells: list[dict], title: str, path: Path, columns: int = 4) -> None:
    """Write a grid of captioned thumbnails to `path`: cells {"images": [Path, ...], "caption": str}.

    One image per cell, or two (a pair) side by side; an unreadable file is a grey "cannot open" box; an
    empty list gives a small figure saying "nothing to show". At most THUMB_MAX_CELLS cells are drawn.
    """
    _save(_thumbnail_grid_figure(cells, title, columns), path)
