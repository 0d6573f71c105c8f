"""Heads on cached features: every kind learns, selects on val, refits on train+val and round-trips exactly."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import normalize

from pipeline.core.config import HeadParams
from pipeline.features.hdf5 import StoreError, load_arrays, save_arrays, sealed_h5
from pipeline.features.store import SPLIT_CODES, FeatureStore, read_store, write_store
from pipeline.heads.persistence import chosen_file, head_files, load_head, save_head
from pipeline.heads.registry import HEADS, HeadError
from pipeline.heads.selection import selection_method, train_head
from pipeline.heads.trained import chosen_head
from tests.conftest import make_store

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
    classes = [f"c{k}" for k in range(n_classes)]
    return make_store(np.vstack(features), labels, split, classes, fingerprint=fingerprint, backbone="test")


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
    head = train_head(store, "knn", HeadParams(kind="knn", grid={"n_neighbors": [15, 1]}, selection="val"))
    assert head.selection == "the val split (90 images)"
    accuracies = {c["n_neighbors"]: c["val_accuracy"] for c in head.val_curve}
    assert list(accuracies) == [1, 15]  # ascending, whatever the order in params
    assert accuracies[15] > accuracies[1]
    assert head.hyperparameters["n_neighbors"] == 15
    # The curve is the val accuracy of the model trained on train alone.
    (x_train, y_train), (x_val, y_val) = store.subset("train"), store.subset("val")
    knn = KNeighborsClassifier(n_neighbors=15, metric="cosine").fit(normalize(x_train), y_train)
    assert accuracies[15] == pytest.approx((knn.predict(normalize(x_val)) == y_val).mean())


def test_a_small_val_split_chooses_by_stratified_cross_validation_on_train_and_val():
    store = blob_store({"train": (40, 40, 40), "val": (6, 6, 6), "test": (5, 5, 5)}, separation=1.5)
    head = train_head(store, "knn", HeadParams(kind="knn", grid={"n_neighbors": [1, 15]}, cv_folds=4))
    assert head.selection == "4-fold cross-validation on train+val (138 images, seed 0; val has 18, fewer than 1000)"
    # Each point's score: the share of train+val images it gets right when held out, over the folds of
    # StratifiedKFold(4, shuffle, seed 0) (138 rows: folds of 35, 35, 34, 34, so not the mean of fold accuracies).
    x, y = store.subset("train", "val")
    for record in head.val_curve:
        right, fold_scores = 0, []
        for fit, held in StratifiedKFold(4, shuffle=True, random_state=0).split(x, y):
            knn = KNeighborsClassifier(n_neighbors=record["n_neighbors"], metric="cosine")
            knn.fit(normalize(x[fit]), y[fit])
            correct = knn.predict(normalize(x[held])) == y[held]
            right, fold_scores = right + correct.sum(), [*fold_scores, correct.mean()]
        assert record["val_accuracy"] == pytest.approx(right / 138)
        assert record["val_accuracy_std"] == pytest.approx(np.std(fold_scores))
    assert head.hyperparameters["n_neighbors"] == 15  # on 138 images the vote of 15 beats the noise of 1
    # The kept model is refit on every train+val row, as after a choice on val.
    assert len(head.model.named_steps["clf"].reference_labels_) == 138


@pytest.mark.parametrize(
    ("params", "n_val", "expected"),
    [
        (
            HeadParams(),
            37,
            (5, "5-fold cross-validation on train+val (120 images, seed 0; val has 37, fewer than 1000)"),
        ),
        (HeadParams(), 1000, (0, "the val split (1000 images)")),
        (
            HeadParams(selection="cv", cv_folds=3),
            5000,
            (3, "3-fold cross-validation on train+val (120 images, seed 0)"),
        ),
        (HeadParams(selection="val"), 37, (0, "the val split (37 images)")),
    ],
)
def test_where_grid_points_are_scored(params, n_val, expected):
    assert selection_method(params, np.repeat([0, 1, 2], 40), n_val) == expected


def test_a_class_too_small_for_k_folds_lowers_k_and_below_two_uses_val():
    assert selection_method(HeadParams(), np.array([0] * 30 + [1] * 3), 10)[0] == 3
    folds, how = selection_method(HeadParams(), np.array([0] * 30 + [1]), 10)
    assert folds == 0 and how == "the val split (10 images; a class has one train+val image, too few to cross-validate)"


def test_cv_folds_below_two_is_a_params_error_naming_the_head(blobs):
    with pytest.raises(HeadError, match=r"heads\.h\.cv_folds must be >= 2; got 1"):
        train_head(blobs, "h", HeadParams(kind="logreg", grid={"C": [1.0]}, cv_folds=1))


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


def test_knn_keeps_the_row_numbers_of_the_rows_it_was_fitted_on(blobs):
    refit = train_head(blobs, "knn", HeadParams(kind="knn", grid={"n_neighbors": [3]}))
    train_only = train_head(blobs, "knn", HeadParams(kind="knn", grid={"n_neighbors": [3]}, refit_on_train_val=False))
    for head, splits in ((refit, ("train", "val")), (train_only, ("train",))):
        clf = head.model.named_steps["clf"]
        np.testing.assert_array_equal(clf.reference_rows_, blobs.rows(*splits))  # 90 + 36, then 90
        np.testing.assert_array_equal(clf.reference_labels_, blobs.subset(*splits)[1])
        assert clf._reference is blobs.features  # searched where they lie: no copy of the rows is kept


def test_the_test_split_is_never_read(trained, blobs):
    poisoned = FeatureStore(**{**blobs.__dict__, "features": blobs.features.copy()})
    poisoned.features[poisoned.split == SPLIT_CODES["test"]] = np.nan  # any estimator would refuse NaN
    for kind in KINDS:
        head = train_head(poisoned, kind, HeadParams(kind=kind, grid=GRIDS[kind]))
        # The same head as one trained with the test rows intact: nothing it learned came from them.
        assert head.val_curve == trained[kind].val_curve
        np.testing.assert_array_equal(head.predict_proba(blobs.features), trained[kind].predict_proba(blobs.features))


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_is_exact(trained, blobs, kind, tmp_path):
    head = trained[kind]
    save_head(head, tmp_path / "head.h5")
    loaded = load_head(tmp_path / "head.h5", blobs)
    np.testing.assert_array_equal(loaded.predict_proba(blobs.features), head.predict_proba(blobs.features))
    np.testing.assert_array_equal(loaded.model.predict(blobs.features), head.model.predict(blobs.features))
    assert loaded.hyperparameters == head.hyperparameters
    assert loaded.val_curve == head.val_curve
    assert loaded.trainable_params == head.trainable_params


@pytest.mark.parametrize("kind", ["centroid", "knn"])
def test_a_cl2n_head_saves_its_centre_and_loads_to_the_same_answers(blobs, kind, tmp_path):
    grid = {"n_neighbors": [1, 3]} if kind == "knn" else {}
    head = train_head(blobs, kind, HeadParams(kind=kind, args={"normalize": "cl2n"}, grid=grid))
    estimator = head.model[-1]
    estimator = getattr(estimator, "estimator_", estimator)
    np.testing.assert_allclose(estimator.mean_, blobs.subset("train", "val")[0].mean(axis=0), rtol=1e-5)
    save_head(head, tmp_path / "head.h5")
    loaded = load_head(tmp_path / "head.h5", blobs)
    loaded_estimator = getattr(loaded.model[-1], "estimator_", loaded.model[-1])
    np.testing.assert_array_equal(loaded_estimator.mean_, estimator.mean_)
    np.testing.assert_array_equal(loaded.predict_proba(blobs.features), head.predict_proba(blobs.features))
    assert loaded.hyperparameters["normalize"] == "cl2n"


def test_a_binary_head_round_trips(tmp_path):
    store = blob_store({"train": (20, 20), "val": (8, 8), "test": (8, 8)})
    for kind in KINDS:
        head = train_head(store, kind, HeadParams(kind=kind, grid=GRIDS[kind]))
        save_head(head, tmp_path / f"{kind}.h5")
        loaded = load_head(tmp_path / f"{kind}.h5", store)
        np.testing.assert_array_equal(loaded.predict_proba(store.features), head.predict_proba(store.features))
        assert accuracy(loaded, store, "test") >= 0.95


def test_loading_against_another_store_fingerprint_fails(trained, tmp_path):
    save_head(trained["ridge"], tmp_path / "ridge.h5")
    other = blob_store(BALANCED, fingerprint="def")
    other.attrs.update(backbone="resnet50", image_size=224, precision="fp32")
    with pytest.raises(StoreError) as err:
        load_head(tmp_path / "ridge.h5", other)
    assert str(err.value) == (  # the fingerprints, and what computed each side's features
        f"{tmp_path / 'ridge.h5'} was trained on features with fingerprint abc (test), but the feature "
        "store has def (resnet50 at 224 px, fp32); rerun the head stage"
    )


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
    with pytest.raises(HeadError, match=r"heads\.h\.grid\.k: not an argument of CosineNeighbors"):
        train_head(blobs, "h", HeadParams(kind="knn", grid={"k": [1, 5]}))
    with pytest.raises(HeadError, match=r"heads\.h\.grid\.C: empty list"):
        train_head(blobs, "h", HeadParams(kind="logreg", grid={"C": []}))
    with pytest.raises(HeadError, match=r"heads\.h: RidgeClassifier could not be fitted .*'alpha' parameter"):
        train_head(blobs, "h", HeadParams(kind="ridge", args={"alpha": -1.0}))
    with pytest.raises(HeadError, match=r"heads\.h: LbfgsLinearSVC could not be fitted .*C == -1"):
        train_head(blobs, "h", HeadParams(kind="linear_svm", grid={"C": [-1.0]}))


def test_knn_skips_a_k_larger_than_the_train_split(blobs):
    head = train_head(blobs, "knn", HeadParams(kind="knn", grid={"n_neighbors": [3.0, 1000.0]}, selection="val"))
    assert [c["n_neighbors"] for c in head.val_curve] == [3]  # and 3.0 from YAML became the integer 3
    message = r"heads\.h\.grid: every value of n_neighbors exceeds the {} rows a point is fitted on"
    with pytest.raises(HeadError, match=message.format(90)):  # the train split
        train_head(blobs, "h", HeadParams(kind="knn", grid={"n_neighbors": [1000]}, selection="val"))
    with pytest.raises(HeadError, match=message.format(100)):  # 4/5 of train+val's 126 rows, with 5 folds
        train_head(blobs, "h", HeadParams(kind="knn", grid={"n_neighbors": [1000]}))


@pytest.mark.parametrize("kind", ["centroid", "linear_svm", "ridge"])
def test_the_temperature_fitted_on_val_is_kept_after_the_refit(trained, kind):
    head = trained[kind]
    chosen = next(c for c in head.val_curve if all(c[k] == head.hyperparameters[k] for k in GRIDS[kind]))
    assert head.model.named_steps["clf"].temperature_ == chosen["temperature"] > 0


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


def test_a_head_keeps_what_its_features_were(trained, tmp_path):
    head = trained["logreg"]
    expected = {
        "backbone": "test",
        "fingerprint": "abc",
        "image_size": None,
        "weights_file": None,
        "precision": None,
        "embedding": None,  # the plain embedding (pipeline.features.embedding)
    }
    assert head.store_attrs == expected
    save_head(head, tmp_path / "head.h5")
    assert load_head(tmp_path / "head.h5").store_attrs == expected
    arrays, attrs = load_arrays(tmp_path / "head.h5")
    del attrs["store"]  # a head saved before heads kept them
    save_arrays(tmp_path / "head.h5", arrays, attrs)
    assert load_head(tmp_path / "head.h5").store_attrs == {}


# The head file's datasets: each public fitted attribute of the pipeline, by path.
SCALER = ["scale.mean_", "scale.n_features_in_", "scale.n_samples_seen_", "scale.scale_", "scale.var_"]
CALIBRATED = ["clf.classes_", "clf.n_features_in_", "clf.temperature_"]
SUB = ["clf.estimator_.classes_", "clf.estimator_.n_features_in_"]
DATASETS = {
    "logreg": [*SCALER, "clf.classes_", "clf.coef_", "clf.intercept_", "clf.n_features_in_", "clf.n_iter_"],
    "ridge": [*SCALER, *CALIBRATED, *SUB, "clf.estimator_.coef_", "clf.estimator_.intercept_"]
    + ["clf.estimator_.n_iter_", "clf.estimator_.solver_"],
    "linear_svm": [*SCALER, *CALIBRATED, *SUB, "clf.estimator_.coef_", "clf.estimator_.intercept_"]
    + ["clf.estimator_.n_iter_"],
    # Row numbers of the store, not embeddings: the head reads its reference rows from the store it was trained on.
    # mean_: the centre of normalize cl2n (None with l2, a null dataset).
    "knn": ["clf.classes_", "clf.mean_", "clf.n_features_in_", "clf.reference_labels_", "clf.reference_rows_"],
    "centroid": [*CALIBRATED, *SUB, "clf.estimator_.centroids_", "clf.estimator_.mean_"],
}


@pytest.mark.parametrize("kind", KINDS)
def test_a_head_file_holds_the_public_fitted_attributes_as_datasets(trained, blobs, tmp_path, kind):
    save_head(trained[kind], tmp_path / "head.h5")
    arrays, _ = load_arrays(tmp_path / "head.h5")
    assert sorted(arrays) == sorted(DATASETS[kind])
    loaded = load_head(tmp_path / "head.h5", blobs).model.named_steps["clf"]
    if kind in ("ridge", "linear_svm", "centroid"):
        assert type(loaded.temperature_) is float  # 0-d datasets come back as Python scalars
    if kind == "ridge":
        # A fitted None (HDF5's null dataspace) and a string come back as they were.
        assert loaded.estimator_.n_iter_ is None
        assert loaded.estimator_.solver_ == trained[kind].model[-1].estimator_.solver_


@pytest.mark.parametrize("weights", ["uniform", "distance"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_knn_head_gives_cosine_kneighbors_probabilities(weights, dtype):
    """KNeighborsClassifier(metric="cosine", algorithm="brute")'s neighbours and votes, its distance weighting with its
    rule for zero distances included. Bit for bit on float32 rows (the store's): both normalise as `normalize` does
    and take one float32 matrix product of the same shape. float64 rows are searched in float32 here, in float64
    there: the same neighbours, distance-weighted votes equal to float32 rounding."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 8)).astype(dtype) + 0.3
    y = rng.integers(0, 5, size=200)
    x[40:50] = 3 * x[:10]  # the same directions: zero distances, which distance weighting treats apart
    y[40:50] = y[:10]  # and the same labels: which of two copies ranks first (a tie) changes no vote
    queries = np.vstack([rng.normal(size=(100, 8)).astype(dtype), x[:20]])
    for k in (1, 7):
        before = KNeighborsClassifier(k, weights=weights, metric="cosine", algorithm="brute").fit(x, y)
        now = HEADS["knn"].build({"n_neighbors": k, "weights": weights}).fit(x, y)
        np.testing.assert_array_equal(now.predict(queries), before.predict(queries))
        if dtype == np.float32 or weights == "uniform":
            np.testing.assert_array_equal(now.predict_proba(queries), before.predict_proba(queries))
        else:
            # Where float64 finds a distance of 1e-16 float32 finds 0, and the other neighbours' votes go to 0.
            np.testing.assert_allclose(now.predict_proba(queries), before.predict_proba(queries), atol=1e-5)


def test_loading_a_missing_head_file_says_to_train_it(tmp_path):
    with pytest.raises(StoreError, match=r"head file .*missing\.h5 not found; run the head stage first"):
        load_head(tmp_path / "missing.h5")


def rewrite(path: Path, change) -> None:
    """Save the head file again with its datasets changed by `change(arrays)`, its attributes kept."""
    arrays, attrs = load_arrays(path)
    change(arrays)
    save_arrays(path, arrays, attrs)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # A head saved with skops, before heads were saved as datasets.
        (lambda a: a.update(model=np.zeros(8, dtype=np.uint8)), "in the old skops format; rerun the head stage"),
        # Attribute paths the pipeline has no place for: another step, private state, a sub-estimator
        # the step has no argument for. None of them may set anything.
        (lambda a: a.update({"step.coef_": np.ones(3)}), r"unknown head file format \(dataset 'step\.coef_'\)"),
        (lambda a: a.update({"clf._fit_X": np.ones(3)}), r"unknown head file format \(dataset 'clf\._fit_X'\)"),
        (lambda a: a.update({"scale.estimator_.coef_": np.ones(3)}), "unknown head file format"),
        (lambda a: a.update({"clf.coef_.real_": np.ones(3)}), "unknown head file format"),
        (lambda a: a.update({"clf.estimator_": np.ones(3)}), "unknown head file format"),
        # Plain arrays under names of their own, as heads were saved before skops.
        (lambda a: a.update(coef=np.ones(3)), r"unknown head file format \(dataset 'coef'\)"),
        (lambda a: [a.pop(k) for k in list(a) if k.startswith("clf.")], "no fitted TemperatureScaled in this"),
        (lambda a: a.clear(), "no fitted StandardScaler in this head file; rerun the head stage"),
    ],
)
def test_a_head_file_in_another_format_is_refused(trained, tmp_path, change, message):
    save_head(trained["ridge"], tmp_path / "head.h5")
    rewrite(tmp_path / "head.h5", change)
    with pytest.raises(StoreError, match=rf"head\.h5: .*{message}"):
        load_head(tmp_path / "head.h5")


# Run in a fresh interpreter: load a saved head and predict, then train and save one (a knn head too: its search
# runs in numpy on a machine without a GPU). The head stages must stay light: none of these may be imported
# (skops, for one, imports torch through scikit-learn).
NO_TORCH = """
import sys
import numpy as np
from pipeline.core.config import HeadParams
from pipeline.heads.persistence import load_head, save_head
from pipeline.heads.selection import selection_method, train_head
from pipeline.features.store import FeatureStore

head = load_head(sys.argv[1])
head.predict_proba(np.ones((4, head.model.n_features_in_), dtype=np.float32))
rng = np.random.default_rng(0)
store = FeatureStore(
    features=rng.normal(size=(60, 4)).astype(np.float32), labels=np.arange(60) % 3, split=np.arange(60) % 2,
    paths=[""] * 60, sha256=[""] * 60, attrs={"classes": ["a", "b", "c"], "fingerprint": "f"},
)
save_head(train_head(store, "h", HeadParams(kind="ridge")), sys.argv[1] + ".new")
save_head(train_head(store, "k", HeadParams(kind="knn", grid={"n_neighbors": [1, 3]})), sys.argv[1] + ".knn")
load_head(sys.argv[1] + ".knn", store).predict_proba(store.features)
for kind in ("logreg", "linear_svm"):  # device: auto decides without torch on a machine without a GPU
    train_head(store, "h", HeadParams(kind=kind, grid={"C": [0.1, 1.0]}))
print([m for m in ("torch", "torchvision", "timm", "skops") if m in sys.modules])
"""


def test_the_head_stages_import_no_torch(trained, tmp_path):
    save_head(trained["ridge"], tmp_path / "head.h5")
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(tmp_path / "head.h5")], cwd=root, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def _edit(path: Path, arrays=None, attrs=None) -> None:
    """Save the head file again with `arrays(a)` / `attrs(a)` applied to its datasets / attributes."""
    a, b = load_arrays(path)
    if arrays:
        arrays(a)
    if attrs:
        attrs(b)
    save_arrays(path, a, b)


def _huge(path: Path) -> None:
    """Replace the coefficients by a dataset that declares 8 TB and stores nothing (HDF5's fill value)."""
    a, b = load_arrays(path)
    with sealed_h5(path) as f:  # sealed: the size is what is refused, not a missing checksum
        for key, value in a.items():
            if key != "clf.coef_":
                f.create_dataset(key, data=value)
        f.create_dataset("clf.coef_", shape=(10**6, 10**6), dtype="f8", chunks=(1, 1024))
        f.attrs["schema_version"] = 1
        for key, value in b.items():
            f.attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value)


def _set(key: str, value) -> Callable[[dict], None]:
    return lambda a: a.__setitem__(key, value)


@pytest.mark.parametrize(
    ("craft", "message"),
    [
        (lambda p: _edit(p, attrs=lambda a: a["hyperparameters"].update(bogus=1)), "do not build this head"),
        (lambda p: _edit(p, arrays=_set("clf.coef_", np.ones((2, DIM)))), "inconsistent head file"),
        (lambda p: _edit(p, arrays=_set("clf.coef_", np.ones((1, DIM)))), "inconsistent head file"),
        (lambda p: _edit(p, arrays=_set("clf.coef_", np.ones((3, DIM + 1)))), "inconsistent head file"),
        (lambda p: _edit(p, arrays=_set("clf.coef_", np.ones((3, DIM), dtype=complex))), "clf.coef_.*complex"),
        (lambda p: _edit(p, arrays=_set("clf.coef_", np.array([[b"x"] * DIM] * 3))), "clf.coef_"),
        (lambda p: _edit(p, attrs=lambda a: a.update(classes=a["classes"][:2])), "2 class names.*3 classes"),
        (lambda p: _edit(p, arrays=lambda a: a.pop("clf.coef_")), "inconsistent head file"),
        (lambda p: _edit(p, arrays=lambda a: a.pop("scale.scale_")), "inconsistent head file"),
        (_huge, r"clf\.coef_ declares 8,000,000,000,000 bytes"),
    ],
    ids=["unknown-hyperparameter", "too-few-rows", "one-row", "too-many-columns", "complex", "text", "short-class-list"]
    + ["no-coefficients", "no-scale", "huge-declared-shape"],
)
def test_a_crafted_head_file_is_one_line_error_not_a_traceback(trained, tmp_path, craft, message):
    path = tmp_path / "head.h5"
    save_head(trained["logreg"], path)
    craft(path)
    with pytest.raises(StoreError, match=rf"head\.h5: .*{message}.*rerun the head stage") as err:
        load_head(path).predict_proba(np.zeros((2, DIM)))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "knn"])  # a knn head file holds no real numbers
def test_a_head_with_a_nan_is_refused_at_load(trained, tmp_path, kind):
    path = tmp_path / "head.h5"
    save_head(trained[kind], path)
    arrays, _ = load_arrays(path)
    key = max((k for k, v in arrays.items() if np.asarray(v).dtype.kind == "f"), key=lambda k: np.size(arrays[k]))

    def poison(a):
        a[key] = np.array(a[key], dtype=np.float64)
        a[key].flat[0] = np.nan

    _edit(path, arrays=poison)
    with pytest.raises(StoreError, match=rf"head\.h5: {re.escape(key)} holds 1 non-finite value.*rerun the head stage"):
        load_head(path)


def test_a_knn_head_reads_its_reference_rows_from_its_store_and_is_refused_without_it(trained, blobs, tmp_path):
    path, store_path = tmp_path / "knn.h5", tmp_path / "store.h5"
    save_head(trained["knn"], path)
    with pytest.raises(StoreError) as err:
        load_head(path)
    assert str(err.value) == (
        f"{path}: a knn head reads its reference embeddings from the feature store it was trained on (fingerprint "
        "abc); give that store (--features data/features/<backbone>.h5)"
    )
    write_store(store_path, labels=blobs.labels, split=blobs.split, paths=blobs.paths, sha256=blobs.sha256,
                feature_chunks=iter([blobs.features]), feature_dim=DIM, attrs=blobs.attrs)  # fmt: skip
    expected = trained["knn"].predict_proba(blobs.features)
    for store in (blobs, store_path):  # in memory (the head stage, the report), or its file (predict, HeadFile)
        np.testing.assert_array_equal(load_head(path, store).predict_proba(blobs.features), expected)
    files = head_files(tmp_path, tmp_path, ["store"], ["knn"])
    files[0].path.parent.mkdir()
    save_head(replace(trained["knn"], backbone="store"), files[0].path)
    np.testing.assert_array_equal(files[0].load().predict_proba(blobs.features), expected)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a.update({"clf.reference_rows_": a["clf.reference_rows_"] + 1000}), "are not rows of the feature"),
        (lambda a: a.update({"clf.reference_labels_": (a["clf.reference_labels_"] + 1) % 3}), "with the labels it"),
        (lambda a: a.update({"clf.reference_rows_": a["clf.reference_rows_"][:-1]}), "reference_rows_ of shape"),
        (lambda a: a.update({"clf.reference_rows_": a["clf.reference_rows_"] * 1.0}), "and type float64"),
        # A knn head of the old format, whose file copied every reference embedding.
        (lambda a: a.update({"clf.reference_": np.ones((3, DIM))}), "saved with copies of its reference embeddings"),
    ],
    ids=["rows-out-of-range", "other-labels", "one-row-short", "real-row-numbers", "old-format"],
)
def test_a_knn_head_whose_rows_do_not_fit_its_store_is_a_one_line_error(trained, blobs, tmp_path, change, message):
    path = tmp_path / "knn.h5"
    save_head(trained["knn"], path)
    rewrite(path, change)
    with pytest.raises(StoreError, match=rf"knn\.h5: .*{message}.*rerun the head stage") as err:
        load_head(path, blobs)
    assert "\n" not in str(err.value)


def test_a_knn_head_not_yet_pointed_at_its_store_is_not_saved(blobs, tmp_path):
    head = replace(
        train_head(blobs, "knn", HeadParams(kind="knn")), model=HEADS["knn"].build({}).fit(*blobs.subset("train"))
    )
    with pytest.raises(ValueError, match="a knn head is saved once it searches its feature store's rows"):
        save_head(head, tmp_path / "knn.h5")


def test_the_knn_grid_from_one_search_is_each_point_fitted_on_its_own(monkeypatch):
    """The sweep finds the held-out rows' neighbours once, for the largest k, and derives every (k, weighting) from
    them: the same curve, choice and model as fitting and scoring each point from scratch, fold by fold."""
    store = blob_store({"train": (40, 40, 40), "val": (6, 6, 6), "test": (5, 5, 5)}, separation=1.5)
    params = HeadParams(kind="knn", grid={"n_neighbors": [1, 4, 15], "weights": ["uniform", "distance"]}, cv_folds=3)
    swept = train_head(store, "knn", params)
    monkeypatch.setitem(HEADS, "knn", replace(HEADS["knn"], sweep=None))
    fitted = train_head(store, "knn", params)
    assert swept.val_curve == fitted.val_curve and len(swept.val_curve) == 6
    assert swept.hyperparameters == fitted.hyperparameters
    np.testing.assert_array_equal(swept.predict_proba(store.features), fitted.predict_proba(store.features))


def test_a_head_is_refused_against_a_store_of_another_manifest_naming_both(trained, blobs, tmp_path):
    """Same features (fingerprint), another split of them: the head may have trained on the store's test rows."""
    store = FeatureStore(**{**blobs.__dict__, "attrs": {**blobs.attrs, "manifest_sha256": "1" * 64}})
    head = train_head(store, "logreg", HeadParams(grid={"C": [1.0]}))
    assert head.manifest_sha256 == "1" * 64
    save_head(head, tmp_path / "head.h5")
    assert load_head(tmp_path / "head.h5", store).manifest_sha256 == "1" * 64
    resplit = FeatureStore(**{**blobs.__dict__, "attrs": {**blobs.attrs, "manifest_sha256": "2" * 64}})
    with pytest.raises(StoreError, match=r"manifest 1111111111111111.*manifest 2222222222222222.*rerun the head stage"):
        load_head(tmp_path / "head.h5", resplit)
    renamed = FeatureStore(**{**store.__dict__, "attrs": {**store.attrs, "classes": ["c0", "c1", "cX"]}})
    with pytest.raises(StoreError, match=r"classes \['c0', 'c1', 'c2'\].*\['c0', 'c1', 'cX'\].*rerun the head stage"):
        load_head(tmp_path / "head.h5", renamed)


def test_an_ill_conditioned_ridge_fit_is_explained_once_instead_of_warned_per_fold(caplog, recwarn):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 150))
    x[:, 100:] = x[:, :50] * 1.0000001  # nearly repeated columns: a singular system without alpha
    store = make_store(x, np.repeat([0, 1], 100), np.tile([0, 0, 0, 1, 2], 40), ["a", "b"])
    with caplog.at_level("INFO", logger="pipeline.heads.selection"):
        head = train_head(store, "ridge", HeadParams(kind="ridge", grid={"alpha": [1e-12, 10.0]}))
    assert not [w for w in recwarn if "Singular matrix" in str(w.message) or "ill-conditioned" in str(w.message)]
    explained = [r.getMessage() for r in caplog.records if "ill-conditioned" in r.getMessage()]
    assert explained == [
        "heads.ridge: {'alpha': 1e-12}: ill-conditioned least squares (the solver warned), so this fit may be "
        "inexact; its held-out score decides whether it is used"
    ]
    assert head.hyperparameters["alpha"] == 10.0


def test_the_chosen_head_is_the_best_held_out_and_ties_go_to_params_order(trained):
    logreg, knn, ridge = (replace(trained[k]) for k in ("logreg", "knn", "ridge"))
    logreg.val_curve = [{"val_accuracy": 0.9, "val_log_loss": 0.5}]
    knn.val_curve = [{"val_accuracy": 0.95, "val_log_loss": 0.9}]
    ridge.val_curve = [{"val_accuracy": 0.95, "val_log_loss": 0.1}]  # ties knn: its lower log loss does not count
    assert chosen_head([logreg, knn, ridge]).name == "knn"
    assert chosen_head([logreg, ridge, knn]).name == "ridge"
    ridge.selection = "the val split (90 images)"
    with pytest.raises(HeadError, match=r"scored on different held-out rows \(logreg: .*; ridge: the val split"):
        chosen_head([logreg, knn, ridge])


def test_head_files_name_each_model_by_backbone_and_head_and_refuse_an_unlabelled_store(tmp_path):
    """Every reader finds a (backbone, head) pair as the head@<b>-<head> stage wrote it; a store of a version that
    did not label its backbone gives a head named otherwise, which is refused in one line."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 20)
    features, split = rng.normal(size=(40, 4)) + labels[:, None], np.tile([0, 0, 0, 1, 2], 8)
    for label, attrs in (("lite", {"label": "lite"}), ("old", {})):
        store_path = tmp_path / "features" / f"{label}.h5"
        write_store(store_path, labels=labels, split=split, paths=[f"{i}.png" for i in range(40)],
                    sha256=["0" * 64] * 40, feature_chunks=iter([features.astype(np.float32)]), feature_dim=4,
                    attrs={"classes": ["a", "b"], "fingerprint": label, **attrs})  # fmt: skip
        head = train_head(read_store(store_path), "logreg", HeadParams(grid={"C": [1.0]}))
        save_head(head, tmp_path / "heads" / label / "logreg.h5")
    files = head_files(tmp_path / "features", tmp_path / "heads", ["lite", "old"], ["logreg"])
    assert [f.model_name for f in files] == ["lite-logreg", "old-logreg"]
    assert files[0].load().model_name == "lite-logreg" and chosen_file(files[:1])[0] == files[0]
    with pytest.raises(StoreError, match=r"logreg\.h5 is named 'logreg', not 'old-logreg'; rerun the head stage"):
        files[1].load()
