"""The few-shot learning curve (CLIP / CoOp protocol): the shots drawn, selection blind to the test split, the
t-interval, a class with fewer images than k, and what the report and the chart make of it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import scipy.stats
from matplotlib import pyplot as plt
from matplotlib.patches import Patch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.core.config import HeadParams
from pipeline.features.store import SPLIT_CODES, FeatureStore
from pipeline.heads import curves
from pipeline.heads.curves import VAL_SHOTS, learning_curve, shot_order
from pipeline.heads.registry import HeadError
from pipeline.heads.selection import train_head
from pipeline.results import charts
from pipeline.results.few_shot import summarised
from pipeline.results.markdown import _learning_curve
from pipeline.results.stats import t_interval
from tests.conftest import make_store

TRAIN, VAL, TEST = SPLIT_CODES["train"], SPLIT_CODES["val"], SPLIT_CODES["test"]
GRID = {"C": [0.001, 0.01, 0.1, 1.0, 10.0]}


def store_of(counts: dict[str, tuple[int, int, int]], dim: int = 8, seed: int = 0) -> FeatureStore:
    """Classes with (train, val, test) images each, blobs a little apart, rows of the splits interleaved."""
    rng = np.random.default_rng(seed)
    labels, split = [], []
    for c, sizes in enumerate(counts.values()):
        for code, n in zip((TRAIN, VAL, TEST), sizes, strict=True):
            labels += [c] * n
            split += [code] * n
    order = rng.permutation(len(labels))
    labels, split = np.array(labels)[order], np.array(split)[order]
    centres = rng.normal(size=(len(counts), dim)) * 1.2
    features = centres[labels] + rng.normal(size=(len(labels), dim))
    return make_store(features, labels, split, list(counts), backbone="b", label="b")


@pytest.fixture(scope="module")
def store() -> FeatureStore:
    return store_of({"ants": (30, 8, 20), "bees": (25, 6, 20), "wasps": (40, 10, 20)})


@pytest.fixture(scope="module")
def head(store):
    return train_head(store, "logreg", HeadParams(grid=GRID))


def test_each_draw_holds_k_train_and_min_k_4_val_images_per_class_from_their_splits(store):
    for seed in range(3):
        order = shot_order(store, seed)
        for k in (1, 2, 4, 8, 16):
            train, val = order.draw(k)
            assert np.all(store.split[train] == TRAIN) and np.all(store.split[val] == VAL)
            assert np.bincount(store.labels[train], minlength=3).tolist() == [k] * 3
            assert np.bincount(store.labels[val], minlength=3).tolist() == [min(k, VAL_SHOTS)] * 3
            assert len(np.unique(train)) == len(train) and not set(train) & set(val)
    again, other = shot_order(store, 1), shot_order(store, 2)
    assert all(np.array_equal(a, b) for a, b in zip(again.draw(4), shot_order(store, 1).draw(4), strict=True))
    assert not np.array_equal(again.draw(8)[0], other.draw(8)[0])  # another seed, another draw
    small, large = again.draw(2), again.draw(8)  # one seed's draws are nested
    assert set(small[0]) <= set(large[0]) and set(small[1]) <= set(large[1])


def test_a_class_with_fewer_images_than_k_gives_all_it_has_and_the_point_says_so(caplog):
    store = store_of({"ants": (30, 8, 10), "bees": (3, 1, 10), "wasps": (30, 8, 10)})
    train, val = shot_order(store, 0).draw(8)
    assert np.bincount(store.labels[train]).tolist() == [8, 3, 8]
    assert np.bincount(store.labels[val]).tolist() == [4, 1, 4]
    head = train_head(store, "logreg", HeadParams(grid={"C": [1.0]}))
    caplog.set_level("WARNING", logger="pipeline.heads.curves")
    points = learning_curve(store, head, HeadParams(grid={"C": [1.0]}), shots=[1, 8], seeds=2)
    by_label = {p["label"]: p for p in points}
    assert by_label["1"]["short_classes"] == []
    assert by_label["8"]["short_classes"] == [{"class": "bees", "train": 3, "val": 1}]
    assert "8-shot: 1 of 3 classes have fewer than 8 train or 4 val images" in caplog.text
    text = "\n".join(_learning_curve(summarised(points), "b-logreg"))
    assert "At k = 8, 1 classes have fewer images; all of theirs are used: bees (3 + 1)." in text


def test_selection_never_reads_the_test_split(store, head, monkeypatch):
    """What each fit is given holds the drawn shots and no test row; test rows made useless (labels permuted,
    features replaced by noise) change the test scores, and nothing of what was chosen or drawn."""
    seen: list[FeatureStore] = []

    def spy(shots: FeatureStore, name: str, params: HeadParams):
        seen.append(shots)
        return train_head(shots, name, params)

    monkeypatch.setattr(curves, "train_head", spy)
    params = HeadParams(grid=GRID)
    points = learning_curve(store, head, params, shots=[1, 4, 8], seeds=3)
    assert len(seen) == 9
    for shots, (k, seed) in zip(seen, [(k, s) for k in (1, 4, 8) for s in range(3)], strict=True):
        assert not np.any(shots.split == TEST)
        train, val = shot_order(store, seed).draw(k)
        assert np.array_equal(shots.features, store.features[np.sort(np.r_[train, val])])
        assert np.bincount(shots.labels[shots.split == VAL]).tolist() == [min(k, VAL_SHOTS)] * 3

    rng = np.random.default_rng(1)
    test = store.split == TEST
    labels, features = store.labels.copy(), store.features.copy()
    labels[test] = rng.permutation(labels[test])
    features[test] = rng.normal(size=(int(test.sum()), store.features.shape[1])) * 5
    corrupted = replace(store, labels=labels, features=features)
    spoiled = learning_curve(corrupted, head, params, shots=[1, 4, 8], seeds=3)
    for a, b in zip(points, spoiled, strict=True):
        choice = [(r["seed"], r["chosen"], r["val_accuracy"]) for r in a["runs"]]
        assert choice == [(r["seed"], r["chosen"], r["val_accuracy"]) for r in b["runs"]]
    assert [r["accuracy"] for p in points for r in p["runs"]] != [r["accuracy"] for p in spoiled for r in p["runs"]]
    for seed in range(3):
        assert all(np.array_equal(a, b) for a, b in zip(shot_order(store, seed).draw(8),
                                                         shot_order(corrupted, seed).draw(8), strict=True))  # fmt: skip


def test_a_point_is_the_grid_chosen_on_the_val_shots_fitted_on_the_train_shots_and_scored_on_test(store, head):
    params = HeadParams(grid={"C": [0.01, 1.0]}, args={"max_iter": 1000})
    (point, every) = learning_curve(store, head, params, shots=[4], seeds=1)
    train, val = shot_order(store, 0).draw(4)
    x_test, y_test = store.subset("test")
    fits = {}
    for c in (0.01, 1.0):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000, random_state=0))
        fits[c] = model.fit(store.features[train], store.labels[train])
    val_accuracy = {c: float((m.predict(store.features[val]) == store.labels[val]).mean()) for c, m in fits.items()}
    (run,) = point["runs"]
    assert run["val_accuracy"] == pytest.approx(max(val_accuracy.values()))
    assert val_accuracy[run["chosen"]["C"]] == max(val_accuracy.values())
    best = fits[run["chosen"]["C"]]  # no refit on the train + val shots
    assert run["accuracy"] == pytest.approx(float((best.predict(x_test) == y_test).mean()))
    assert (point["per_class"], point["val_per_class"]) == (4, 4)
    # Every image: the head as trained (train+val, its grid chosen by the head stage's rule), not refit.
    assert every["label"] == "all" and every["runs"][0]["chosen"] == {"C": head.hyperparameters["C"]}
    assert every["runs"][0]["accuracy"] == float((head.predict_proba(x_test).argmax(1) == y_test).mean())
    assert every["per_class"] == 25 + 6  # bees: the smallest class of train+val


def test_the_t_interval_is_scipys_and_one_seed_has_none():
    values = [0.8, 0.85, 0.9]
    sem = scipy.stats.sem(values)
    expected = scipy.stats.t.interval(0.95, 2, loc=0.85, scale=sem)
    assert t_interval(values) == pytest.approx(expected)
    assert t_interval(values) == pytest.approx((0.85 - 4.302653 * 0.05 / 3**0.5, 0.85 + 4.302653 * 0.05 / 3**0.5))
    assert t_interval([0.5, 0.7], confidence=0.9) == pytest.approx(scipy.stats.t.interval(0.9, 1, 0.6, 0.1))
    assert t_interval([0.7]) is None
    assert t_interval([0.6, 0.6, 0.6]) == (0.6, 0.6)
    runs = [{"seed": s, "accuracy": a, "chosen": {}, "val_accuracy": 1.0} for s, a in enumerate([0.96, 0.99, 1.0])]
    point = {"model": "m", "label": "2", "per_class": 2, "val_per_class": 2, "runs": runs, "short_classes": []}
    (summary,) = summarised([point])
    assert summary["accuracy"] == pytest.approx(np.mean([0.96, 0.99, 1.0]))
    assert summary["low"] == pytest.approx(t_interval([0.96, 0.99, 1.0])[0]) and summary["high"] == 1.0  # clipped
    (single,) = summarised([{**point, "runs": runs[:1]}])
    assert (single["low"], single["high"], single["seeds"]) == (None, None, 1)


def test_the_protocol_needs_a_val_split(store, head):
    no_val = replace(store, split=np.where(store.split == VAL, TRAIN, store.split).astype(np.uint8))
    with pytest.raises(HeadError, match="draws its validation images from the val split, and the store has none"):
        learning_curve(no_val, head, HeadParams(), shots=[1], seeds=1)


def test_knn_points_whose_k_exceed_a_one_shot_draw_are_left_out_and_the_rest_chosen(store):
    params = HeadParams(kind="knn", grid={"n_neighbors": [1, 3, 50]})
    head = train_head(store, "knn", params)
    points = learning_curve(store, head, params, shots=[1, 16], seeds=2)
    one, sixteen = points[0]["runs"], points[1]["runs"]
    assert all(r["chosen"]["n_neighbors"] in (1, 3) for r in one)  # 3 rows, one per class: 50 is skipped
    assert all(r["chosen"]["n_neighbors"] in (1, 3) for r in sixteen)  # 48 train shots: still under 50


def test_the_report_section_and_chart_show_the_mean_its_interval_and_each_seed(store, head):
    points = summarised(learning_curve(store, head, HeadParams(grid=GRID), shots=[1, 2], seeds=3))
    text = "\n".join(_learning_curve(points, "b-logreg"))
    assert "few-shot protocol" in text and "never on the test split" in text and "t-interval" in text
    row = next(line for line in text.splitlines() if line.startswith("| 2 + 2 |"))
    assert f"{points[1]['accuracy']:.4f} ({points[1]['low']:.4f}-{points[1]['high']:.4f})" in row
    assert row.count("C=") == 3
    assert any(line.startswith("| all (at least ") for line in text.splitlines())
    fig = charts._learning_curve_figure(points, "b-logreg", None, None)
    ax = fig.axes[0]
    legend = ax.get_legend()
    entries = dict(zip([t.get_text() for t in legend.get_texts()], legend.legend_handles, strict=True))
    plt.close(fig)
    band = [text for text in entries if "t-interval" in text]
    assert band == ["b-logreg: 95% t-interval over 3 seeds"] and isinstance(entries[band[0]], Patch)
    assert "each seed" in entries and any("as trained, all images" in text for text in entries)
