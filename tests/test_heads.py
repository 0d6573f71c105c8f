"""Heads on cached features: every kind learns, selects on val, refits on train+val and round-trips exactly."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import normalize
from sklearn.svm import LinearSVC

from pipeline.config import HeadParams
from pipeline.heads import HEADS, HeadError, LbfgsLinearSVC, fit_temperature, load_head, save_head, train_head
from pipeline.store import SPLIT_CODES, FeatureStore, StoreError

DIM = 6

# Small grids, one per kind, in each estimator's own argument names.
GRIDS = {
    "logreg": {"C": [0.01, 1.0]},
    "ridge": {"alpha": [0.1, 10.0]},
    "linear_svm": {"C": [0.01, 1.0]},
    "knn": {"n_neighbors": [1, 5]},
    "centroid": {},
}
KINDS = sorted(GRIDS)
BALANCED_OK = ["linear_svm", "logreg", "ridge"]


def blob_store(
    counts: dict[str, tuple[int, ...]], separation: float = 5.0, seed: int = 0, fingerprint: str = "abc"
) -> FeatureStore:
    """Gaussian blobs, one per class around separation * e_k; counts[split][k] rows of class k."""
    rng = np.random.default_rng(seed)
    n_classes = len(counts["train"])
    centres = np.eye(n_classes, DIM) * separation + 1.0  # the offset keeps the cosine heads honest
    features, labels, split = [], [], []
    for name, per_class in counts.items():
        for k, m in enumerate(per_class):
            features.append(centres[k] + rng.normal(size=(m, DIM)))
            labels += [k] * m
            split += [SPLIT_CODES[name]] * m
    return FeatureStore(
        features=np.vstack(features).astype(np.float32),
        labels=np.array(labels, dtype=np.int64),
        split=np.array(split, dtype=np.uint8),
        paths=[f"{i}.png" for i in range(len(labels))],
        sha256=["0" * 64] * len(labels),
        attrs={"classes": [f"c{k}" for k in range(n_classes)], "fingerprint": fingerprint, "backbone": "test"},
    )


BALANCED = {"train": (30, 30, 30), "val": (12, 12, 12), "test": (12, 12, 12)}


@pytest.fixture(scope="module")
def blobs() -> FeatureStore:
    return blob_store(BALANCED)


@pytest.fixture(scope="module")
def trained(blobs: FeatureStore) -> dict:
    return {kind: train_head(blobs, kind, HeadParams(kind=kind, grid=GRIDS[kind])) for kind in KINDS}


def accuracy(head, store: FeatureStore, split: str) -> float:
    x, y = store.subset(split)
    return float((head.predict_proba(x).argmax(1) == y).mean())


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_learns_separable_blobs(trained, blobs, kind):
    head = trained[kind]
    assert max(c["val_accuracy"] for c in head.val_curve) >= 0.95
    assert accuracy(head, blobs, "test") >= 0.95
    assert len(head.val_curve) == max([1, *(len(v) for v in GRIDS[kind].values())])


@pytest.mark.parametrize("kind", KINDS)
def test_probabilities_are_valid(trained, blobs, kind):
    far = np.vstack([blobs.features, blobs.features * 100, -blobs.features])  # also far from any training row
    proba = trained[kind].predict_proba(far)
    assert proba.shape == (len(far), 3)
    assert np.all(proba >= 0) and np.all(proba <= 1)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-12)


def test_the_chosen_grid_value_is_the_best_on_val():
    # Overlapping blobs: one neighbour follows the noise, fifteen vote it away.
    store = blob_store({"train": (40, 40, 40), "val": (30, 30, 30), "test": (5, 5, 5)}, separation=1.5)
    head = train_head(store, "knn", HeadParams(kind="knn", grid={"n_neighbors": [15, 1]}))
    accuracies = {c["n_neighbors"]: c["val_accuracy"] for c in head.val_curve}
    assert list(accuracies) == [1, 15]  # ascending, whatever the order in params
    assert accuracies[15] > accuracies[1]
    assert head.hyperparameters["n_neighbors"] == 15
    # The curve is the val accuracy of the model trained on train alone.
    (x_train, y_train), (x_val, y_val) = store.subset("train"), store.subset("val")
    knn = KNeighborsClassifier(n_neighbors=15, metric="cosine").fit(normalize(x_train), y_train)
    assert accuracies[15] == pytest.approx((knn.predict(normalize(x_val)) == y_val).mean())


@pytest.mark.parametrize("kind", KINDS)
def test_refit_on_train_val_learns_a_class_seen_only_in_val(kind):
    store = blob_store({"train": (20, 20, 0), "val": (6, 6, 12), "test": (6, 6, 6)})
    grid = {**GRIDS[kind], **({"n_neighbors": [1, 3]} if kind == "knn" else {})}
    refit = train_head(store, kind, HeadParams(kind=kind, grid=grid))
    train_only = train_head(store, kind, HeadParams(kind=kind, grid=grid, refit_on_train_val=False))
    x_test, y_test = store.subset("test")
    assert (refit.predict_proba(x_test).argmax(1)[y_test == 2] == 2).mean() >= 0.8
    assert np.all(train_only.predict_proba(x_test)[:, 2] == 0)
    assert (refit.n_train, refit.n_val) == (40, 24)


def test_knn_keeps_the_rows_it_was_fitted_on(blobs):
    refit = train_head(blobs, "knn", HeadParams(kind="knn", grid={"n_neighbors": [3]}))
    train_only = train_head(blobs, "knn", HeadParams(kind="knn", grid={"n_neighbors": [3]}, refit_on_train_val=False))
    assert len(HEADS["knn"].to_arrays(refit.model)["reference_labels"]) == 90 + 36
    assert len(HEADS["knn"].to_arrays(train_only.model)["reference_labels"]) == 90


def test_the_test_split_is_never_read(blobs):
    poisoned = FeatureStore(**{**blobs.__dict__, "features": blobs.features.copy()})
    poisoned.features[poisoned.split == SPLIT_CODES["test"]] = np.nan  # any estimator would refuse NaN
    for kind in KINDS:
        train_head(poisoned, kind, HeadParams(kind=kind, grid=GRIDS[kind]))


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_is_exact(trained, blobs, kind, tmp_path):
    head = trained[kind]
    save_head(head, tmp_path / "head.h5")
    loaded = load_head(tmp_path / "head.h5", blobs)
    np.testing.assert_allclose(
        loaded.predict_proba(blobs.features), head.predict_proba(blobs.features), rtol=0, atol=1e-12
    )
    assert loaded.hyperparameters == head.hyperparameters
    assert loaded.val_curve == head.val_curve
    assert loaded.trainable_params == head.trainable_params


def test_a_binary_head_round_trips(tmp_path):
    store = blob_store({"train": (20, 20), "val": (8, 8), "test": (8, 8)})
    for kind in KINDS:
        head = train_head(store, kind, HeadParams(kind=kind, grid=GRIDS[kind]))
        save_head(head, tmp_path / f"{kind}.h5")
        loaded = load_head(tmp_path / f"{kind}.h5", store)
        np.testing.assert_allclose(loaded.predict_proba(store.features), head.predict_proba(store.features), atol=1e-12)
        assert accuracy(loaded, store, "test") >= 0.95


def test_loading_against_another_store_fingerprint_fails(trained, tmp_path):
    save_head(trained["ridge"], tmp_path / "ridge.h5")
    other = blob_store(BALANCED, fingerprint="def")
    with pytest.raises(StoreError, match="fingerprint abc.*def"):
        load_head(tmp_path / "ridge.h5", other)


@pytest.mark.parametrize("kind", BALANCED_OK)
def test_class_weight_balanced_is_accepted_and_used(kind):
    store = blob_store({"train": (60, 12, 6), "val": (12, 12, 12), "test": (12, 12, 12)})
    head = train_head(store, kind, HeadParams(kind=kind, args={"class_weight": "balanced"}, grid=GRIDS[kind]))
    assert head.hyperparameters["class_weight"] == "balanced"
    estimator = head.model.named_steps["clf"]
    assert "balanced" in {
        estimator.get_params().get("class_weight"),
        estimator.get_params().get("estimator__class_weight"),
    }
    assert accuracy(head, store, "test") >= 0.9


@pytest.mark.parametrize("kind", ["knn", "centroid"])
def test_class_weight_is_rejected_where_it_does_not_apply(blobs, kind):
    with pytest.raises(HeadError, match=r"heads\.h\.args\.class_weight: .*does not apply"):
        train_head(blobs, "h", HeadParams(kind=kind, args={"class_weight": "balanced"}))


def test_unknown_kind_and_unknown_argument_name_the_key(blobs):
    with pytest.raises(HeadError, match=r"heads\.h\.kind: unknown head 'svm'; valid: logreg, ridge"):
        train_head(blobs, "h", HeadParams(kind="svm"))
    with pytest.raises(HeadError, match=r"heads\.h\.args\.gamma: not an argument of LbfgsLinearSVC"):
        train_head(blobs, "h", HeadParams(kind="linear_svm", args={"gamma": 1.0}))
    with pytest.raises(HeadError, match=r"heads\.h\.grid\.k: not an argument of KNeighborsClassifier"):
        train_head(blobs, "h", HeadParams(kind="knn", grid={"k": [1, 5]}))
    with pytest.raises(HeadError, match=r"heads\.h\.grid\.C: empty list"):
        train_head(blobs, "h", HeadParams(kind="logreg", grid={"C": []}))
    with pytest.raises(HeadError, match=r"heads\.h: RidgeClassifier could not be fitted .*'alpha' parameter"):
        train_head(blobs, "h", HeadParams(kind="ridge", args={"alpha": -1.0}))
    with pytest.raises(HeadError, match=r"heads\.h: LbfgsLinearSVC could not be fitted .*C == -1"):
        train_head(blobs, "h", HeadParams(kind="linear_svm", grid={"C": [-1.0]}))


def test_knn_skips_a_k_larger_than_the_train_split(blobs):
    head = train_head(blobs, "knn", HeadParams(kind="knn", grid={"n_neighbors": [3.0, 1000.0]}))
    assert [c["n_neighbors"] for c in head.val_curve] == [3]  # and 3.0 from YAML became the integer 3
    with pytest.raises(HeadError, match=r"heads\.h\.grid: every value of n_neighbors exceeds the 90 train rows"):
        train_head(blobs, "h", HeadParams(kind="knn", grid={"n_neighbors": [1000]}))


@pytest.mark.parametrize("kind", ["centroid", "linear_svm", "ridge"])
def test_the_temperature_fitted_on_val_is_kept_after_the_refit(trained, kind):
    head = trained[kind]
    chosen = next(c for c in head.val_curve if all(c[k] == head.hyperparameters[k] for k in GRIDS[kind]))
    assert head.model.named_steps["clf"].temperature_ == chosen["temperature"] > 0


def test_fit_temperature_recovers_the_temperature_that_made_the_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(20000, 4))
    proba = np.exp(logits / 2.5)
    proba /= proba.sum(axis=1, keepdims=True)
    targets = (proba.cumsum(axis=1) < rng.random((20000, 1))).sum(axis=1)
    assert fit_temperature(logits, targets) == pytest.approx(2.5, rel=0.05)


def test_trainable_params_per_kind(trained):
    counts = {kind: head.trainable_params for kind, head in trained.items()}
    linear = 3 * DIM + 3
    assert counts == {
        "logreg": linear,
        "ridge": linear + 1,
        "linear_svm": linear + 1,
        "knn": 0,
        "centroid": 3 * DIM + 1,
    }


@pytest.mark.parametrize(("n_classes", "class_weight"), [(3, None), (3, "balanced"), (2, None), (2, "balanced")])
def test_lbfgs_linear_svc_finds_liblinears_minimiser(n_classes, class_weight):
    rng = np.random.default_rng(n_classes)
    sizes = [40, 15, 25][:n_classes]
    x = np.vstack([rng.normal(size=(m, 5)) + k for k, m in enumerate(sizes)])
    y = np.repeat(np.arange(n_classes), sizes)
    for c in (0.01, 1.0):
        reference = LinearSVC(C=c, class_weight=class_weight, dual=False, tol=1e-10, max_iter=100_000).fit(x, y)
        ours = LbfgsLinearSVC(C=c, class_weight=class_weight, tol=1e-8).fit(x, y)
        np.testing.assert_allclose(ours.coef_, reference.coef_, atol=1e-4)
        np.testing.assert_allclose(ours.intercept_, reference.intercept_, atol=1e-4)
        np.testing.assert_array_equal(ours.predict(x), reference.predict(x))


def test_lbfgs_linear_svc_takes_class_weights_keyed_by_label():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 4)) + np.repeat(np.eye(3, 4) * 2, 30, axis=0)
    y = np.repeat([3, 5, 9], 30)
    weights = {3: 1.0, 5: 3.0, 9: 0.5}
    reference = LinearSVC(C=0.5, class_weight=weights, dual=False, tol=1e-10, max_iter=100_000).fit(x, y)
    ours = LbfgsLinearSVC(C=0.5, class_weight=weights, tol=1e-8).fit(x, y)
    np.testing.assert_allclose(ours.coef_, reference.coef_, atol=1e-4)
