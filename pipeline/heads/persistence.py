"""Heads saved as plain arrays (HDF5, no pickle) and loaded back through the registry, checked against their store."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from sklearn.base import BaseEstimator, clone
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted

from pipeline.features.hdf5 import HEAD_FIX, StoreError, load_arrays, save_arrays
from pipeline.features.store import FeatureStore, read_attrs, read_store
from pipeline.heads.registry import HEADS, HeadKind
from pipeline.heads.trained import TrainedHead, chosen_head, full_proba


def save_head(head: TrainedHead, path: Path) -> None:
    """Write the head to HDF5: each public fitted attribute of its pipeline as a dataset named by its path
    (`scale.mean_`, `clf.estimator_.coef_`), the rest as attributes. Plain arrays: no pickle, no code. A head that
    keeps store rows (knn) writes their row numbers (`clf.reference_rows_`), not their embeddings."""
    if HEADS[head.kind].reads_store and getattr(head.model[-1], "reference_rows_", None) is None:
        raise ValueError(
            f"{head.name}: a {head.kind} head is saved once it searches its feature store's rows (train_head)"
        )
    save_arrays(
        path,
        _fitted_arrays(head.model),
        {
            "name": head.name,
            "kind": head.kind,
            "classes": head.classes,
            "store_fingerprint": head.store_fingerprint,
            "hyperparameters": head.hyperparameters,
            "val_curve": head.val_curve,
            "fit_seconds": head.fit_seconds,
            "n_train": head.n_train,
            "n_val": head.n_val,
            "store": head.store_attrs,
            "manifest_sha256": head.manifest_sha256,
            "selection": head.selection,
            "backbone": head.backbone,
        },
    )


def load_head(path: Path, store: FeatureStore | Path | None = None, store_attrs: dict | None = None) -> TrainedHead:
    """Load a head, checking that its file is intact and consistent (classes, shapes, finite numbers).

    `store`: the feature store it will be used with, in memory or its file (whose attributes the caller may have
    read: `store_attrs`); the head is refused if it was trained on another one (`check_trained_on`). A knn head keeps
    only the row numbers of its reference rows and reads them from that store (its file, when given a path): it
    cannot be loaded without it.
    """
    arrays, attrs = load_arrays(path)
    if attrs.get("kind") not in HEADS:
        raise StoreError(f"{path}: not a head file (kind {attrs.get('kind')!r})")
    if "manifest_sha256" not in attrs:
        raise StoreError(f"{path}: saved before heads recorded the split they were trained on; {HEAD_FIX}")
    kind = HEADS[attrs["kind"]]
    if kind.reads_store and "clf.reference_" in arrays:
        raise StoreError(f"{path}: a {attrs['kind']} head saved with copies of its reference embeddings; {HEAD_FIX}")
    _check_arrays(path, arrays)
    hyperparameters = _decoded(attrs["hyperparameters"])
    model = _restore(path, kind, hyperparameters, arrays)
    head = TrainedHead(
        name=attrs["name"],
        kind=attrs["kind"],
        model=model,
        classes=attrs["classes"],
        store_fingerprint=attrs["store_fingerprint"],
        hyperparameters=hyperparameters,
        val_curve=attrs["val_curve"],
        fit_seconds=float(attrs["fit_seconds"]),
        n_train=int(attrs["n_train"]),
        n_val=int(attrs["n_val"]),
        store_attrs=attrs.get("store", {}),
        manifest_sha256=attrs["manifest_sha256"],
        selection=attrs.get("selection", "the val split"),
        backbone=attrs.get("backbone", ""),
    )
    if store is not None:
        in_memory = isinstance(store, FeatureStore)
        store_attrs = store.attrs if in_memory else store_attrs or read_attrs(store)
        check_trained_on(head, store_attrs, path, "the feature store" if in_memory else store)
    if kind.reads_store:
        _search_store_rows(path, head, store)
    _check_predicts(path, model, attrs["classes"])
    return head


def _search_store_rows(path: Path, head: TrainedHead, store: FeatureStore | Path | None) -> None:
    """Point a knn head at its reference rows in the store it was trained on (its fingerprint already checked), once
    the rows are known to hold the labels it was trained on."""
    clf = head.model[-1]
    if store is None:
        raise StoreError(
            f"{path}: a {head.kind} head reads its reference embeddings from the feature store it was trained on "
            f"(fingerprint {head.store_fingerprint}); give that store (--features data/features/<backbone>.h5)"
        )
    if not isinstance(store, FeatureStore):
        store = read_store(store, expect_fingerprint=head.store_fingerprint)
    _check_shapes(path, head.model)  # the row numbers and labels agree before they index anything
    rows, labels = np.asarray(clf.reference_rows_), np.asarray(clf.reference_labels_)
    in_store = not rows.size or (rows.min() >= 0 and rows.max() < len(store.labels))
    if not in_store or not np.array_equal(store.labels[rows], labels):
        raise StoreError(
            f"{path}: its {len(rows)} reference rows are not rows of the feature store with the labels it was "
            f"trained on; {HEAD_FIX}"
        )
    clf.use_store_rows(store.features, rows)


def check_trained_on(head: TrainedHead, store_attrs: dict, path: Path, store: Path | str) -> None:
    """Refuse to use a head with a store other than the one it was trained on, naming both values: other
    features (fingerprint), another split of the same features (manifest: the store's test rows may be ones the
    head trained on), or other class names (every prediction would be labelled wrong)."""
    fingerprint, manifest = store_attrs.get("fingerprint"), store_attrs.get("manifest_sha256")
    if head.store_fingerprint != fingerprint:
        raise StoreError(
            f"{path} was trained on features with fingerprint {head.store_fingerprint} "
            f"({_features_of(head.store_attrs)}), but {store} has {fingerprint} ({_features_of(store_attrs)}); "
            f"{HEAD_FIX}"
        )
    if head.manifest_sha256 != manifest:
        raise StoreError(
            f"{path} was trained on the split of manifest {str(head.manifest_sha256)[:16]}, but {store} holds "
            f"manifest {str(manifest)[:16]} (prepare ran again: its test rows may be ones the head trained on); "
            f"{HEAD_FIX}"
        )
    if head.classes != list(store_attrs.get("classes", [])):
        raise StoreError(f"{path} has classes {head.classes}, but {store} has {store_attrs.get('classes')}; {HEAD_FIX}")


def _features_of(attrs: dict) -> str:
    """What computed a store's features, in words: the backbone, its weights file when one was given, the size."""
    weights = f", weights {attrs['weights_file']}" if attrs.get("weights_file") else ""
    precision = f", {attrs['precision']}" if attrs.get("precision") else ""
    size = f" at {attrs['image_size']} px" if attrs.get("image_size") else ""
    return f"{attrs.get('backbone') or 'unknown backbone'}{size}{weights}{precision}"


def _decoded(hyperparameters: dict) -> dict:
    """JSON keys are strings: a class_weight mapping is keyed by class index (the labels) again."""
    weights = hyperparameters.get("class_weight")
    if isinstance(weights, dict):
        return {**hyperparameters, "class_weight": {int(k): v for k, v in weights.items()}}
    return hyperparameters


def _check_arrays(path: Path, arrays: dict[str, Any]) -> None:
    """Every dataset is what `_as_dataset` writes: real numbers, all finite (a NaN would print as a probability),
    or a scalar text or None."""
    for key, value in arrays.items():
        if isinstance(value, (h5py.Empty, bytes, str)):
            continue
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":
            raise StoreError(f"{path}: {key} holds {array.dtype} values, not real numbers; {HEAD_FIX}")
        bad = int(np.size(array) - np.isfinite(array).sum()) if array.dtype.kind == "f" else 0
        if bad:
            raise StoreError(f"{path}: {key} holds {bad} non-finite value(s) (NaN or infinity); {HEAD_FIX}")


def _check_predicts(path: Path, model: Pipeline, classes: list[str]) -> None:
    """A file missing an array, holding one of the wrong shape, or a class list that does not name every class
    the model predicts, fails here in one line, not at scoring."""
    labels = np.asarray(getattr(model, "classes_", []))
    if labels.dtype.kind not in "iu" or len(set(classes)) != len(classes) or labels.min(initial=0) < 0:
        raise StoreError(f"{path}: class labels {labels.tolist()} for class names {classes}; {HEAD_FIX}")
    if labels.max(initial=-1) >= len(classes):
        raise StoreError(
            f"{path}: {len(classes)} class names, but the model predicts {int(labels.max()) + 1} classes; {HEAD_FIX}"
        )
    _check_shapes(path, model)
    try:
        proba = full_proba(model, np.zeros((1, model.n_features_in_)), len(classes))
    except (AttributeError, ValueError, TypeError, IndexError, NotFittedError) as err:
        problem = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise StoreError(f"{path}: incomplete or inconsistent head file ({problem}); {HEAD_FIX}") from err
    if proba.shape != (1, len(classes)) or not np.isfinite(proba).all():
        raise StoreError(f"{path}: inconsistent head file (it predicts {proba.tolist()}); {HEAD_FIX}")


def _expected_shapes(name: str, features: int, classes: int) -> set[tuple[int, ...]] | None:
    """The shapes a per-feature or per-class fitted array may have, from the features and classes its estimator
    saw (None: not such an array). numpy would broadcast a wrong one (a single row of coefficients, a single
    mean) into plausible probabilities. A linear model keeps one row for two classes, the logit of the second;
    RidgeClassifier keeps that row flat."""
    rows = classes if classes > 2 else 1
    return {
        "coef_": {(rows, features), (features,)} if classes == 2 else {(rows, features)},
        "intercept_": {(rows,)},
        "centroids_": {(classes, features)},
        "mean_": {(features,)},
        "scale_": {(features,)},
        "var_": {(features,)},
    }.get(name)


def _check_shapes(path: Path, model: Pipeline) -> None:
    """Every fitted array of every step (sub-estimators included) has the shape its features and classes give."""

    def check(estimator: BaseEstimator, where: str) -> None:
        state = vars(estimator)
        features, classes = state.get("n_features_in_"), len(state.get("classes_", []))
        if features is not None and not isinstance(features, int):
            raise StoreError(f"{path}: {where}.n_features_in_ is {features!r}, not a count; {HEAD_FIX}")
        for name, value in state.items():
            if isinstance(value, BaseEstimator):
                check(value, f"{where}.{name}")
                continue
            shapes = _expected_shapes(name, features, classes) if features is not None else None
            if shapes is not None and value is not None and np.shape(value) not in shapes:
                expected = " or ".join(map(str, sorted(shapes)))
                raise StoreError(
                    f"{path}: inconsistent head file ({where}.{name} has shape {np.shape(value)}, expected "
                    f"{expected} for {features} features and {classes} classes); {HEAD_FIX}"
                )
        if "reference_labels_" in state:  # k-NN's reference rows: one row number and one label each
            rows, labels = np.asarray(state.get("reference_rows_")), np.shape(state["reference_labels_"])
            if rows.dtype.kind not in "iu" or rows.ndim != 1 or rows.shape != labels:
                raise StoreError(
                    f"{path}: inconsistent head file ({where}.reference_rows_ of shape {rows.shape} and type "
                    f"{rows.dtype} with labels of shape {labels}); {HEAD_FIX}"
                )

    for name, step in model.steps:
        check(step, name)


def _is_fitted_name(name: str) -> bool:
    """scikit-learn's convention for public fitted state: a trailing underscore, no leading one."""
    return name.endswith("_") and not name.startswith("_")


def _fitted_arrays(model: Pipeline) -> dict[str, Any]:
    """Every public fitted attribute of the pipeline's steps by dotted path, a fitted sub-estimator's
    (TemperatureScaled's `estimator_`) included; private state is never needed to predict with our steps."""
    arrays = {}

    def collect(estimator: BaseEstimator, prefix: str) -> None:
        for attr, value in vars(estimator).items():
            if not _is_fitted_name(attr):
                continue
            if isinstance(value, BaseEstimator):
                collect(value, f"{prefix}.{attr}")
            else:
                arrays[f"{prefix}.{attr}"] = _as_dataset(f"{prefix}.{attr}", value)

    for name, step in model.steps:
        collect(step, name)
    return arrays


def _as_dataset(path: str, value: Any) -> Any:
    """A fitted attribute as h5py can write it."""
    if value is None:
        return h5py.Empty("f")  # HDF5's null dataspace: a fitted None (RidgeClassifier's n_iter_) stays None
    if isinstance(value, str):
        return value  # h5py stores a str, not numpy's fixed-width unicode
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{path}: a {type(value).__name__} cannot be saved in a head file, only numbers or text")
    return array


def _restore(path: Path, kind: HeadKind, hyperparameters: dict, arrays: dict[str, Any]) -> Pipeline:
    """The kind's pipeline, built from the registry, with the saved fitted attributes set back on it.

    Types come from the registry only: a dataset can set an attribute, never choose a class.
    """
    rerun = HEAD_FIX
    if "model" in arrays:
        raise StoreError(f"{path}: a head file in the old skops format; {rerun}")
    try:
        model = kind.build(hyperparameters)
    except (TypeError, ValueError) as err:
        raise StoreError(f"{path}: hyperparameters {hyperparameters} do not build this head ({err}); {rerun}") from err
    steps = dict(model.steps)
    for key, value in arrays.items():
        owner, attr = _owner(steps, key)
        if owner is None:
            raise StoreError(f"{path}: unknown head file format (dataset {key!r}); {rerun}")
        setattr(owner, attr, _as_value(value))
    for step in steps.values():  # every step: the pipeline's own check only looks at the last
        try:
            check_is_fitted(step)
        except NotFittedError as err:
            raise StoreError(f"{path}: no fitted {type(step).__name__} in this head file; {rerun}") from err
    return model


def _owner(steps: dict[str, BaseEstimator], key: str) -> tuple[BaseEstimator | None, str]:
    """The estimator a saved path's attribute belongs to (None if the pipeline has no place for it).

    A fitted sub-estimator `x_` is a clone of the step's own unfitted argument `x`, the registry's type.
    """
    step, *names = key.split(".")
    if step not in steps or not names or not all(map(_is_fitted_name, names)):
        return None, key
    *inner, attr = names
    owner = steps[step]
    for name in inner:
        if not isinstance(vars(owner).get(name), BaseEstimator):
            template = owner.get_params(deep=False).get(name[:-1])
            if not isinstance(template, BaseEstimator):
                return None, attr
            setattr(owner, name, clone(template))
        owner = getattr(owner, name)
    if isinstance(getattr(type(owner), attr, None), property):  # a computed attribute: nothing to set
        return None, attr
    if isinstance(owner.get_params(deep=False).get(attr[:-1]), BaseEstimator):  # a sub-estimator's slot
        return None, attr
    return owner, attr


def _as_value(value: Any) -> Any:
    """A dataset as its attribute was: None, str, a Python scalar for 0-d (temperature_ a float), or the array."""
    if isinstance(value, h5py.Empty):
        return None
    if isinstance(value, bytes):
        return value.decode()
    return value.item() if np.ndim(value) == 0 else value


@dataclass(frozen=True)
class HeadFile:
    """Where one (backbone, head) pair of params.yaml lives: its head file and the store it was trained on."""

    backbone: str  # the label under extract.backbones
    name: str  # the head's key under heads
    path: Path  # <heads dir>/<backbone>/<name>.h5
    store: Path  # <features dir>/<backbone>.h5

    @property
    def model_name(self) -> str:
        return f"{self.backbone}-{self.name}"

    def load(self, store_attrs: dict | None = None) -> TrainedHead:
        """The head, refused unless it was trained on this store (checked on its attributes, `store_attrs` when the
        caller has read them: no features read, but for a knn head, which reads its reference rows from the store)."""
        head = load_head(self.path, self.store, store_attrs or read_attrs(self.store))
        if head.model_name != self.model_name:  # a store written before stores carried their label
            raise StoreError(f"{self.path} is named {head.model_name!r}, not {self.model_name!r}; {HEAD_FIX}")
        return head


def head_kind(path: Path) -> str:
    """A head file's kind, from its attributes alone: no model is built and no store is needed."""
    return str(load_arrays(path)[1].get("kind"))


def load_heads(files: list[HeadFile]) -> list[TrainedHead]:
    """Each file's head (`HeadFile.load`), each store's attributes read, and its seal checked, once."""
    attrs = {store: read_attrs(store) for store in dict.fromkeys(f.store for f in files)}
    return [f.load(attrs[f.store]) for f in files]


def chosen_file(files: list[HeadFile]) -> tuple[HeadFile, TrainedHead]:
    """The chosen head (`chosen_head`) among every (backbone, head) pair, with its file and store."""
    trained = load_heads(files)
    best = chosen_head(trained)
    return files[trained.index(best)], best


def head_files(features_dir: Path, heads_dir: Path, backbones: Iterable[str], names: Iterable[str]) -> list[HeadFile]:
    """Every (backbone, head) pair, backbone by backbone, in params.yaml's order (dvc.yaml's layout)."""
    names = list(names)
    return [
        HeadFile(label, name, Path(heads_dir) / label / f"{name}.h5", Path(features_dir) / f"{label}.h5")
        for label in backbones
        for name in names
    ]
