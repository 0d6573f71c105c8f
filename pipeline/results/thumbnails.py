"""Grids of captioned thumbnails for the data audit: images (or pairs) in rows, each captioned below with text
wrapped and shortened to fit its cell."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
from matplotlib import pyplot as plt
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.text import Text
from PIL import Image

from pipeline.data.images import ImageRejected, decode_rgb, read_bytes
from pipeline.results.png import DPI, save_png

CELL_IN = 2.3  # width of one grid cell, and the most height a thumbnail takes
GAP_IN = 0.22  # between two cells of a row
PAIR_GAP_IN = 0.06  # between the two thumbnails of a pair
ROW_GAP_IN = 0.22  # between a row's captions and the next row's thumbnails
MARGIN_IN = 0.15
CAPTION_SIZE = 7.5
CAPTION_MAX_LINES = 6  # longer captions end with an ellipsis
MAX_CELLS = 40  # the caller passes the top ones; beyond this the title says how many were left out


def _thumbnail_grid_figure(cells: list[dict], title: str, columns: int = 4) -> Figure:
    """Thumbnails (one image, or several side by side) in rows of `columns` cells, each captioned below."""
    if not cells:
        return _nothing_to_show_figure(title)
    shown = list(cells[:MAX_CELLS])
    if len(cells) > len(shown):
        title = f"{title} (the first {len(shown)} of {len(cells)})"
    columns = max(1, min(int(columns), len(shown)))
    grid_width = columns * CELL_IN + (columns - 1) * GAP_IN
    fig = plt.figure(figsize=(max(grid_width + 2 * MARGIN_IN, 4.5), 4.0), dpi=DPI)
    heading = _fitted_text(fig, title, 11.0, fig.get_figwidth() - 2 * MARGIN_IN, 3, "title")
    captions = [
        _fitted_text(fig, str(c.get("caption", "")), CAPTION_SIZE, CELL_IN - 0.04, CAPTION_MAX_LINES) for c in shown
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
    height = 2 * MARGIN_IN + title_h + 0.12 + sum(bands) + len(rows) * (0.05 + caption_h + ROW_GAP_IN)
    fig.set_size_inches(width, height)
    heading.set_position((0.5, 1 - MARGIN_IN / height))
    left = (width - columns * CELL_IN - (columns - 1) * GAP_IN) / 2
    y = MARGIN_IN + title_h + 0.12  # inches from the top
    for row, band in zip(rows, bands, strict=True):
        for k, i in enumerate(row):
            x = left + k * (CELL_IN + GAP_IN)
            _draw_cell(fig, pictures[i], (x, y, band))
            captions[i].set_position(((x + CELL_IN / 2) / width, 1 - (y + band + 0.05) / height))
        y += band + 0.05 + caption_h + ROW_GAP_IN


def _box_width(count: int) -> float:
    """Width in inches of each of `count` thumbnails sharing one cell."""
    count = max(1, count)
    return (CELL_IN - (count - 1) * PAIR_GAP_IN) / count


def _cell_pictures(images: list[Path]) -> list[np.ndarray | None]:
    """The cell's images as RGB arrays no larger than their boxes in pixels; None for one that cannot be read."""
    box = (round(_box_width(len(images)) * DPI), round(CELL_IN * DPI))
    return [_thumbnail(path, box) for path in images] or [None]


def _thumbnail(path: Path, box: tuple[int, int]) -> np.ndarray | None:
    """The image as the pipeline reads it (upright by its EXIF orientation, RGB), shrunk to fit `box` (w, h
    pixels), never enlarged; None for a file that cannot be read."""
    try:
        # A JPEG is decoded at a reduced scale whose shorter side still covers the box's longer one.
        image = decode_rgb(read_bytes(path), draft_short_side=max(box))
    except ImageRejected:
        return None
    image.thumbnail(box, Image.Resampling.LANCZOS)
    return np.asarray(image)


def _picture_size(picture: np.ndarray | None, box_width: float) -> tuple[float, float]:
    """Inches (w, h) of a picture fitted into `box_width` x CELL_IN, aspect kept (4:3 for a placeholder)."""
    ratio = 0.75 if picture is None else picture.shape[0] / max(picture.shape[1], 1)
    if box_width * ratio <= CELL_IN:
        return box_width, box_width * ratio
    return CELL_IN / ratio, CELL_IN


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
        left, top = x + j * (box_w + PAIR_GAP_IN) + (box_w - w) / 2, y + band - h  # on its caption
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
    heading = _fitted_text(fig, title, 11.0, 4.5 - 2 * MARGIN_IN, 2, "title")
    heading.set_position((0.5, 1 - MARGIN_IN / 1.4))
    fig.text(0.5, 0.3, "nothing to show", ha="center", va="center", fontsize=10, color="0.4", style="italic")
    return fig


def thumbnail_grid_png(cells: list[dict], title: str, path: Path, columns: int = 4) -> None:
    """Write a grid of captioned thumbnails to `path`: cells {"images": [Path, ...], "caption": str}.

    One image per cell, or two (a pair) side by side; an unreadable file is a grey "cannot open" box; an
    empty list gives a small figure saying "nothing to show". At most MAX_CELLS cells are drawn.
    """
    save_png(_thumbnail_grid_figure(cells, title, columns), path)
