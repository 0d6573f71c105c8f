"""Labels for the points of a chart, placed without overlap: in aligned columns beside crowded clusters, with
thin leader lines, off the other points' markers and error bars. Used by the accuracy-against-time chart.

Written by hand: matplotlib places a text where it is told and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.transforms import Bbox

LABEL_GAP_PX = 3.0  # vertical space between two stacked point labels
LABEL_OFFSET_PX = 9.0  # horizontal distance from a point to its label
LABEL_MAX_CHARS = 40  # longer point labels are shortened with an ellipsis


def frame(fig: Figure, ax: Axes) -> None:
    """A fixed layout, margins in inches (labels are placed in pixels, so the axes must not move afterwards)."""
    width, height = fig.get_size_inches()
    left, right, bottom, top = 0.8, 0.22, 0.97, 0.37
    ax.set_position((left / width, bottom / height, 1 - (left + right) / width, 1 - (bottom + top) / height))


def short(name: str, limit: int = LABEL_MAX_CHARS) -> str:
    """The name, cut with an ellipsis beyond `limit` characters (the report's table has it whole)."""
    return name if len(name) <= limit else name[: limit - 1] + "…"


@dataclass(frozen=True)
class Mark:
    """One point to label: its name, position (data) and error bar."""

    name: str
    x: float
    y: float
    low: float
    high: float


def place_labels(fig: Figure, ax: Axes, marks: list[Mark]) -> None:
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
        frame(fig, ax)


def _widen_for_labels(fig: Figure, ax: Axes, labels: list[Text], marks: list[Mark]) -> None:
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


def _layout_labels(fig: Figure, ax: Axes, labels: list[Text], marks: list[Mark], avoid_bars: bool) -> bool:
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


def _obstacle(ax: Axes, mark: Mark, whole_bar: bool) -> tuple[float, float, float, float]:
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
