"""The report's charts: files that open, numbers that match the data, labels that stay readable."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from matplotlib import pyplot as plt
from matplotlib.patches import Patch
from PIL import Image

from pipeline.results import charts
from pipeline.results.metrics import top_label_ece


def _curve_point(k: int | None, scores: list[float], low: float | None, high: float | None) -> dict:
    """A learning-curve point as pipeline.results.few_shot.summarised writes it (k None: every image)."""
    runs = [{"seed": s, "accuracy": a, "chosen": {"C": 0.1}, "val_accuracy": 0.9} for s, a in enumerate(scores)]
    return {"label": "all" if k is None else str(k), "per_class": k or 122, "accuracy": float(np.mean(scores)),
            "low": low, "high": high, "seeds": len(scores), "runs": runs}  # fmt: skip


CURVE = [
    _curve_point(1, [0.33, 0.36, 0.39], 0.29, 0.43),
    _curve_point(4, [0.67, 0.69, 0.71], 0.64, 0.74),
    _curve_point(16, [0.85, 0.86, 0.87], 0.84, 0.88),
    _curve_point(None, [0.98], None, None),
]
TUNED_CURVE = [{"per_class": 5, "accuracy": 0.62}, {"per_class": 20, "accuracy": 0.9}]


def _point(name: str, strategy: str, seconds: float, accuracy: float) -> dict:
    return {
        "name": name,
        "strategy": strategy,
        "seconds": seconds,
        "accuracy": accuracy,
        "low": accuracy - 0.035,
        "high": min(1.0, accuracy + 0.035),
    }


# Five heads at nearly the same time and accuracy (extraction dominates their cost), one long name.
COINCIDENT = [
    _point("logreg", "feature_extraction", 9.2, 0.948),
    _point("linear_svm", "feature_extraction", 9.25, 0.946),
    _point("ridge", "feature_extraction", 9.3, 0.944),
    _point("knn_with_a_rather_long_descriptive_name", "feature_extraction", 9.4, 0.941),
    _point("centroid", "feature_extraction", 9.33, 0.943),
    _point("finetune", "fine_tuning", 52.0, 0.947),
]
SPREAD = [
    _point("centroid", "feature_extraction", 15.1, 0.851),
    _point("knn", "feature_extraction", 15.2, 0.915),
    _point("ridge", "feature_extraction", 16.2, 0.959),
    _point("logreg", "feature_extraction", 18.7, 0.978),
    _point("linear_svm", "feature_extraction", 24.8, 0.970),
    _point("finetune", "fine_tuning", 151.9, 1.0),
]
CROWDED = [_point(f"head_{i}", "feature_extraction", 9.2 + 0.02 * i, 0.94 + 0.001 * i) for i in range(12)] + [
    _point("finetune_all_blocks_lr_0.003", "fine_tuning", 52.0, 0.945)
]


def _confusion(path: Path) -> None:
    actual = ["ants"] * 70 + ["bees"] * 83
    charts.confusion_png(actual, actual[::-1], ["ants", "bees"], "logreg on test", path)


def _reliability(path: Path) -> None:
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.3, 1.0, 269)
    charts.reliability_png(confidence, rng.random(269) < confidence, 0.04, 15, "logreg on test", path)


def _learning_curve(path: Path) -> None:
    charts.learning_curve_png(CURVE, "logreg", path, tuned_curve=TUNED_CURVE, tuned_accuracy=1.0)


def _accuracy_vs_time(path: Path) -> None:
    charts.accuracy_vs_time_png(COINCIDENT, path)


@pytest.mark.parametrize(
    ("draw", "width", "height"),
    [
        (_confusion, (400, 900), (350, 800)),
        (_reliability, (450, 900), (450, 900)),
        (_learning_curve, (500, 1000), (350, 700)),
        (_accuracy_vs_time, (600, 1100), (400, 800)),
    ],
)
def test_each_figure_is_a_png_of_a_report_size(tmp_path, draw, width, height):
    open_figures = plt.get_fignums()
    path = tmp_path / "sub" / "figure.png"
    draw(path)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert width[0] <= image.width <= width[1]
        assert height[0] <= image.height <= height[1]
    assert plt.get_fignums() == open_figures  # the figure was closed


def test_confusion_counts_match_a_hand_computed_matrix():
    actual = ["cat", "cat", "cat", "dog", "dog", "owl"]
    predicted = ["cat", "dog", "cat", "dog", "owl", "cat"]
    expected = np.array([[2, 1, 0], [0, 1, 1], [1, 0, 0]])
    np.testing.assert_array_equal(charts.confusion_counts(actual, predicted, ["cat", "dog", "owl"]), expected)

    fig = charts._confusion_figure(actual, predicted, ["cat", "dog", "owl"], "head")
    ax = fig.axes[0]
    drawn = np.zeros((3, 3), dtype=int)
    for text in ax.texts:
        column, row = text.get_position()
        drawn[int(round(row)), int(round(column))] = int(text.get_text())
    plt.close(fig)
    np.testing.assert_array_equal(drawn, expected)
    assert "50.0%" in ax.get_title() and "(3/6)" in ax.get_title()
    assert ax.get_xlabel() == "predicted class" and ax.get_ylabel() == "true class"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cat", "dog", "owl"]


def test_confusion_rejects_labels_outside_the_classes():
    with pytest.raises(ValueError, match="emu"):
        charts.confusion_counts(["cat", "emu"], ["cat", "cat"], ["cat", "dog"])


def test_many_classes_keep_colours_without_numbers_in_a_bounded_figure(tmp_path):
    classes = [f"class_{i:02d}" for i in range(60)]
    actual = classes * 3
    fig = charts._confusion_figure(actual, actual, classes, "head")
    assert len(fig.axes[0].texts) == 0
    plt.close(fig)
    charts.confusion_png(actual, actual, classes, "head", tmp_path / "c.png")
    with Image.open(tmp_path / "c.png") as image:
        assert image.width <= 1600 and image.height <= 1600


def _expected_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> dict[int, float]:
    """Accuracy per non-empty bin, by the definition: bin k holds (k/n, (k+1)/n], and 0 joins bin 0."""
    members: dict[int, list[bool]] = {}
    for c, ok in zip(confidence, correct, strict=True):
        k = 0 if c == 0 else next(k for k in range(n_bins) if k / n_bins < c <= (k + 1) / n_bins)
        members.setdefault(k, []).append(bool(ok))
    return {k: sum(v) / len(v) for k, v in members.items()}


def test_reliability_bars_are_the_accuracy_of_each_bin_and_empty_bins_have_none():
    # 5 bins; bin 1 (0.2, 0.4] and bin 3 (0.6, 0.8] stay empty; 0.0 joins bin 0, 1.0 is in bin 4.
    confidence = np.array([0.0, 0.1, 0.15, 0.5, 0.55, 0.45, 0.9, 1.0, 0.95, 0.85])
    correct = np.array([False, True, False, True, True, False, True, True, True, False])
    expected = _expected_bins(confidence, correct, 5)
    assert sorted(expected) == [0, 2, 4]

    fig = charts._reliability_figure(confidence, correct, 0.1, 5, "head")
    top, bottom = fig.axes[:2]
    (bars,) = [c for c in top.containers if c.get_label() == "accuracy"]
    drawn = {int(bar.get_x() * 5 + 1e-9): bar.get_height() for bar in bars}
    counts = {int(bar.get_x() * 5 + 1e-9): bar.get_height() for bar in bottom.patches}
    plt.close(fig)
    assert sorted(drawn) == sorted(expected)
    for k, accuracy in expected.items():
        assert drawn[k] == pytest.approx(accuracy)
    assert counts == {0: 3, 2: 3, 4: 4}
    assert "0.100" in top.get_title()


def test_the_diagram_draws_the_bins_its_ece_is_computed_from():
    rng = np.random.default_rng(1)
    confidence = np.concatenate([[0.0, 0.2, 0.4, 1.0], rng.uniform(0, 1, 200)])  # on the edges, and inside
    correct = rng.random(len(confidence)) < confidence
    fig = charts._reliability_figure(confidence, correct, 0.0, 5, "head")
    top, bottom = fig.axes[:2]
    (bars,) = [c for c in top.containers if c.get_label() == "accuracy"]
    (marks,) = [line for line in top.lines if line.get_label() == "mean confidence"]
    counts = np.array([bar.get_height() for bar in bottom.patches])
    plt.close(fig)
    gaps = np.abs(np.array([bar.get_height() for bar in bars]) - marks.get_ydata())
    assert len(counts) == 5 and counts.sum() == len(confidence)
    assert counts @ gaps / len(confidence) == pytest.approx(top_label_ece(confidence, correct, 5))


def test_learning_curve_legend_explains_the_band():
    fig = charts._learning_curve_figure(CURVE, "logreg", TUNED_CURVE, 1.0)
    ax = fig.axes[0]
    legend = ax.get_legend()
    entries = dict(zip([t.get_text() for t in legend.get_texts()], legend.legend_handles, strict=True))
    band = ax.collections[0].get_paths()[0].vertices
    plt.close(fig)
    assert list(entries)[0] == "logreg: 95% t-interval over 3 seeds"
    assert isinstance(entries["logreg: 95% t-interval over 3 seeds"], Patch)  # the entry shows the band itself
    assert band[:, 1].min() == pytest.approx(0.29) and band[:, 1].max() == pytest.approx(0.88)  # low and high
    assert band[:, 0].max() == 16  # the interval spans the k-shot points, not every image's single run
    assert "each seed" in entries and "logreg as trained, all images" in entries
    assert any("all images" in text and "fine-tuned" in text for text in entries)
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "training images per class"


@pytest.mark.parametrize("points", [COINCIDENT, SPREAD, CROWDED], ids=["coincident", "spread", "crowded"])
def test_accuracy_vs_time_labels_stay_inside_and_never_overlap(points):
    fig = charts._accuracy_vs_time_figure(points)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    labels = [t for t in ax.texts if t.get_text()]
    extents = {t.get_text(): t.get_window_extent(renderer) for t in labels}
    figure_box = fig.bbox
    plt.close(fig)
    assert sorted(extents) == sorted(p["name"] for p in points)
    for name, box in extents.items():
        inside = figure_box.x0 <= box.x0 and box.x1 <= figure_box.x1 and figure_box.y0 <= box.y0
        assert inside and box.y1 <= figure_box.y1, f"{name} leaves the figure: {box} not in {figure_box}"
    for (a, box_a), (b, box_b) in itertools.combinations(extents.items(), 2):
        assert not box_a.overlaps(box_b), f"{a} overlaps {b}"


def test_accuracy_vs_time_axes_and_error_bars():
    fig = charts._accuracy_vs_time_figure(COINCIDENT)
    ax = fig.axes[0]
    legend_texts = [t.get_text() for t in fig.legends[0].get_texts()]
    plt.close(fig)
    assert ax.get_xscale() == "log"
    assert ax.get_xlabel() == "training seconds (heads: extraction + fit)"
    assert ax.get_ylabel().startswith("test accuracy")
    assert len(legend_texts) == 2 and any("fine-tuning" in t for t in legend_texts)
    low, high = ax.get_ylim()
    assert low <= min(p["low"] for p in COINCIDENT) and high >= max(p["high"] for p in COINCIDENT)
