"""The audit's thumbnail grids: pictures upright and never enlarged, captions that fit, unreadable files shown."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from matplotlib import pyplot as plt
from PIL import Image

from pipeline.results import png, thumbnails


def _photo(path: Path, size: tuple[int, int], colour: str = "tan", orientation: int | None = None) -> Path:
    """A small JPEG of one colour, optionally with an EXIF orientation tag."""
    image = Image.new("RGB", size, colour)
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    image.save(path, format="JPEG", exif=exif)
    return path


def _cells(tmp_path: Path) -> list[dict]:
    """Six cells, the second and fifth pairs, with captions as long as the audit's."""
    photos = [_photo(tmp_path / f"photo_{i}.jpg", (160 + 20 * i, 120)) for i in range(8)]
    long_name = "val/ants/ants-devouring-remains-of-large-dead-insect-on-red-tile-in-Stellenbosch.jpg"
    return [
        {"images": [photos[0]], "caption": "given: ants -> suggested: bees\nscore 0.03"},
        {
            "images": [photos[1], photos[2]],
            "caption": f"test/ants/{photos[1].name} ~ train/ants/{photos[2].name}\ncosine 0.987",
        },
        {"images": [photos[3]], "caption": f"{long_name}\ntrue: ants / predicted: bees (0.91)"},
        {"images": [photos[4]], "caption": "one line"},
        {"images": [photos[5], photos[6]], "caption": "a ~ b\ncosine 0.990\nsame photographer"},
        {"images": [photos[7]], "caption": ""},
    ]


def _thumbnail_axes(fig) -> list:
    return [ax for ax in fig.axes if ax.get_gid() == "thumbnail"]


def test_thumbnail_grid_png_opens_and_closes_its_figure(tmp_path):
    open_figures = plt.get_fignums()
    path = tmp_path / "audit" / "grid.png"
    thumbnails.thumbnail_grid_png(_cells(tmp_path), "Near-duplicates", path, columns=3)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert 700 <= image.width <= 900 and 400 <= image.height <= 1000
    assert plt.get_fignums() == open_figures


def test_six_cells_in_three_columns_make_two_rows_with_pairs_side_by_side(tmp_path):
    fig = thumbnails._thumbnail_grid_figure(_cells(tmp_path), "Near-duplicates", columns=3)
    axes = _thumbnail_axes(fig)
    boxes = [ax.get_position() for ax in axes]
    plt.close(fig)
    assert len(axes) == 8  # four singles and two pairs
    assert all(len(ax.images) == 1 for ax in axes)
    bottoms = sorted({round(box.y0, 4) for box in boxes}, reverse=True)  # pictures rest on their captions
    assert len(bottoms) == 2
    per_row = [sorted(box.x0 for box in boxes if round(box.y0, 4) == bottom) for bottom in bottoms]
    assert [len(row) for row in per_row] == [4, 4]  # each row: single, pair (2), single
    for box_a, box_b in itertools.combinations(boxes, 2):
        assert not box_a.overlaps(box_b)


def test_an_unreadable_file_is_a_placeholder_not_an_exception(tmp_path):
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(_photo(tmp_path / "whole.jpg", (400, 300), "navy").read_bytes()[:300])
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not a picture")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "folder.jpg").mkdir()
    cells = [
        {"images": [tmp_path / "missing.jpg"], "caption": "missing"},
        {"images": [truncated, not_an_image], "caption": "truncated ~ text"},
        {"images": [tmp_path / "empty.jpg", tmp_path / "folder.jpg"], "caption": "empty ~ folder"},
        {"images": [tmp_path / "whole.jpg"], "caption": "fine"},
    ]
    fig = thumbnails._thumbnail_grid_figure(cells, "Label issues")
    axes = _thumbnail_axes(fig)
    placeholders = [ax for ax in axes if [t.get_text() for t in ax.texts] == ["cannot open"]]
    plt.close(fig)
    assert len(axes) == 6 and len(placeholders) == 5
    assert all(not ax.images for ax in placeholders)
    thumbnails.thumbnail_grid_png(cells, "Label issues", tmp_path / "grid.png")
    with Image.open(tmp_path / "grid.png") as image:
        assert image.format == "PNG"


def test_exif_orientation_is_applied_and_small_images_are_not_enlarged(tmp_path):
    rotated = _photo(tmp_path / "rotated.jpg", (60, 20), orientation=6)  # stored landscape, shown portrait
    big = _photo(tmp_path / "big.jpg", (3000, 2000))
    fig = thumbnails._thumbnail_grid_figure(
        [{"images": [rotated], "caption": ""}, {"images": [big], "caption": ""}], "t"
    )
    small_shape, big_shape = (ax.images[0].get_array().shape for ax in _thumbnail_axes(fig))
    plt.close(fig)
    assert small_shape == (60, 20, 3)
    assert big_shape[1] <= thumbnails.CELL_IN * png.DPI + 1
    assert big_shape[1] / big_shape[0] == pytest.approx(1.5, abs=0.01)


def test_a_thumbnail_shows_the_pixels_the_pipeline_reads(tmp_path):
    """Decoded by the library's one reader: transparent pixels on white, as extraction sees them."""
    see_through = Image.new("RGBA", (40, 30), (200, 0, 0, 0))
    see_through.paste((0, 0, 200, 255), (0, 0, 20, 30))
    see_through.save(tmp_path / "half.png")
    fig = thumbnails._thumbnail_grid_figure([{"images": [tmp_path / "half.png"], "caption": ""}], "t")
    (ax,) = _thumbnail_axes(fig)
    pixels = ax.images[0].get_array()
    plt.close(fig)
    assert pixels.shape == (30, 40, 3)
    assert pixels[15, 5].tolist() == [0, 0, 200] and pixels[15, 35].tolist() == [255, 255, 255]


def test_thumbnail_captions_stay_inside_and_never_overlap(tmp_path):
    cells = _cells(tmp_path) + _cells(tmp_path)[:3]
    fig = thumbnails._thumbnail_grid_figure(cells, "A title long enough to need wrapping " * 4, columns=4)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [t for t in fig.texts if t.get_text()]
    extents = [t.get_window_extent(renderer) for t in texts]
    pictures = [ax.get_window_extent(renderer) for ax in _thumbnail_axes(fig)]
    figure_box = fig.bbox
    plt.close(fig)
    assert len(texts) == len(cells) - 1 + 1  # one caption is empty; the title
    for text, box in zip(texts, extents, strict=True):
        inside = figure_box.x0 <= box.x0 and box.x1 <= figure_box.x1 and figure_box.y0 <= box.y0
        assert inside and box.y1 <= figure_box.y1, f"{text.get_text()!r} leaves the figure"
        assert not any(box.overlaps(picture) for picture in pictures), f"{text.get_text()!r} covers a picture"
    for (a, box_a), (b, box_b) in itertools.combinations(zip(texts, extents, strict=True), 2):
        assert not box_a.overlaps(box_b), f"{a.get_text()!r} overlaps {b.get_text()!r}"


def test_long_caption_lines_keep_every_line_and_shorten_long_names():
    fig = plt.figure(dpi=png.DPI)
    name = "ants-devouring-remains-of-large-dead-insect-on-red-tile-in-Stellenbosch-South-Africa.jpg"
    text = thumbnails._fitted_text(fig, f"val/ants/{name}\nscore 0.03", 7.5, 2.0, 6)
    plt.close(fig)
    lines = text.get_text().split("\n")
    assert lines[0] == "val/ants/" and lines[-1] == "score 0.03"
    assert lines[1].startswith("ants-devouring") and lines[1].endswith(".jpg") and "…" in lines[1]


def test_too_many_cells_are_cut_and_the_title_says_so(tmp_path):
    photo = _photo(tmp_path / "p.jpg", (40, 30))
    cells = [{"images": [photo], "caption": str(i)} for i in range(thumbnails.MAX_CELLS + 5)]
    fig = thumbnails._thumbnail_grid_figure(cells, "Misclassified")
    count = len(_thumbnail_axes(fig))
    title = next(t.get_text() for t in fig.texts if t.get_gid() == "title")
    plt.close(fig)
    assert count == thumbnails.MAX_CELLS
    assert f"first {thumbnails.MAX_CELLS} of {thumbnails.MAX_CELLS + 5}" in title


def test_an_empty_grid_says_nothing_to_show(tmp_path):
    fig = thumbnails._thumbnail_grid_figure([], "Near-duplicates")
    texts = [t.get_text() for t in fig.texts]
    plt.close(fig)
    assert "nothing to show" in texts and "Near-duplicates" in texts
    thumbnails.thumbnail_grid_png([], "Near-duplicates", tmp_path / "empty.png")
    with Image.open(tmp_path / "empty.png") as image:
        assert image.format == "PNG" and image.height < 300
