"""Heads on cached features: a registry of scikit-learn pipelines, selection on val, plain-array saving."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, log_loss
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.config import HeadParams
from pipeline.errors import PipelineError
from pipeline.store import FeatureStore, StoreError, check_matches, load_arrays, save_arrays

log = logging.getLogger(__name__)


class HeadError(PipelineError):
    """A head is misconfigured (unknown kind, bad argument)."""


@dataclass(frozen=True)
class HeadKind:
    """How to build one kind of head, and how to turn its learned state into arrays and back."""

    build: Callable[[dict], Pipeline]  # estimator arguments -> unfitted pipeline
    to_arrays: Callable[[Pipeline], dict[str, np.ndarray]]
    from_arrays: Callable[[dict[str, np.ndarray]], Pipeline]


# --- logreg: StandardScaler + multinomial logistic regression (lbfgs) ------------------------------


def _build_logreg(args: dict) -> Pipeline:
    return Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(**{"max_iter": 1000, **args}))])


def _logreg_to_arrays(model: Pipeline) -> dict[str, np.ndarray]:
    scaler, clf = model.named_steps["scale"], model.named_steps["clf"]
    return {
        "scaler_mean": scaler.mean_,
        "scaler_scale": scaler.scale_,
        "coef": clf.coef_,
        "intercept": clf.intercept_,
        "classes": clf.classes_,
    }


def _logreg_from_arrays(a: dict[str, np.ndarray]) -> Pipeline:
    scaler = StandardScaler()
    scaler.mean_, scaler.scale_ = a["scaler_mean"], a["scaler_scale"]
    scaler.var_ = scaler.scale_**2
    scaler.n_features_in_ = len(scaler.mean_)
    clf = LogisticRegression()
    clf.coef_, clf.intercept_, clf.classes_ = a["coef"], a["intercept"], a["classes"]
    clf.n_features_in_ = clf.coef_.shape[1]
    return Pipeline([("scale", scaler), ("clf", clf)])


HEADS: dict[str, HeadKind] = {
    "logreg": HeadKind(_build_logreg, _logreg_to_arrays, _logreg_from_arrays),
}


@dataclass
class TrainedHead:
    name: str
    kind: str
    model: Pipeline
    classes: list[str]
    store_fingerprint: str
    hyperparameters: dict  # the chosen grid values plus fixed arguments
    val_curve: list[dict]  # one record per grid point: its values, val accuracy, val log loss
    fit_seconds: float
    n_train: int
    n_val: int

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Probabilities for every class of the store, columns in class-index order."""
        return _full_proba(self.model, features, len(self.classes))

    @property
    def trainable_params(self) -> int:
        arrays = HEADS[self.kind].to_arrays(self.model)
        return int(sum(v.size for k, v in arrays.items() if k.startswith(("coef", "intercept"))))


def train_head(store: FeatureStore, name: str, params: HeadParams) -> TrainedHead:
    """Choose the grid point with the best val accuracy (ties: lower val log loss), then refit."""
    if params.kind not in HEADS:
        raise HeadError(f"heads.{name}.kind: unknown head '{params.kind}'; valid: {', '.join(HEADS)}")
    kind = HEADS[params.kind]
    x_train, y_train = store.subset("train")
    x_val, y_val = store.subset("val")
    labels = np.arange(len(store.classes))
    start = time.perf_counter()
    curve = []
    for point in _grid_points(params.grid):
        model = _fit(kind, {**params.args, **point}, x_train, y_train, name)
        proba = _full_proba(model, x_val, len(labels))
        curve.append(
            {
                **point,
                "val_accuracy": float(accuracy_score(y_val, proba.argmax(1))),
                "val_log_loss": float(log_loss(y_val, proba, labels=labels)),
            }
        )
    best = max(curve, key=lambda c: (c["val_accuracy"], -c["val_log_loss"])) if curve else {}
    chosen = {k: best[k] for k in params.grid}
    if params.refit_on_train_val:
        x_fit, y_fit = store.subset("train", "val")
    else:
        x_fit, y_fit = x_train, y_train
    model = _fit(kind, {**params.args, **chosen}, x_fit, y_fit, name)
    fit_seconds = time.perf_counter() - start
    log.info("head %s: chose %s (val accuracy %s) in %.1fs", name, chosen, best.get("val_accuracy"), fit_seconds)
    return TrainedHead(
        name=name,
        kind=params.kind,
        model=model,
        classes=store.classes,
        store_fingerprint=store.fingerprint,
        hyperparameters={**params.args, **chosen},
        val_curve=curve,
        fit_seconds=fit_seconds,
        n_train=len(y_train),
        n_val=len(y_val),
    )


def _grid_points(grid: dict[str, list[float]]) -> list[dict]:
    keys = sorted(grid)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]


def _fit(kind: HeadKind, args: dict, x: np.ndarray, y: np.ndarray, name: str) -> Pipeline:
    try:
        return kind.build(args).fit(x, y)
    except TypeError as err:  # an argument the estimator does not take
        raise HeadError(f"heads.{name}.args: {err}") from err


def _full_proba(model: Pipeline, x: np.ndarray, n_classes: int) -> np.ndarray:
    """predict_proba with a column for every class; a class absent from training keeps probability 0."""
    full = np.zeros((len(x), n_classes))
    full[:, model.classes_] = model.predict_proba(x)
    # float32 features give float32 probabilities whose rows miss 1 by more than log_loss tolerates.
    return full / full.sum(axis=1, keepdims=True)


def save_head(head: TrainedHead, path: Path) -> None:
    save_arrays(
        path,
        HEADS[head.kind].to_arrays(head.model),
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
        },
    )


def load_head(path: Path, store: FeatureStore | None = None) -> TrainedHead:
    """Load a head; given the store it will score, refuse it if it was trained on another one."""
    arrays, attrs = load_arrays(path)
    if attrs.get("kind") not in HEADS:
        raise StoreError(f"{path}: not a head file (kind {attrs.get('kind')!r})")
    if store is not None and attrs["store_fingerprint"] != store.fingerprint:
        raise StoreError(
            f"{path} was trained on features with fingerprint {attrs['store_fingerprint']}, "
            f"but the store has {store.fingerprint} ({store.attrs.get('backbone')}); rerun train_head"
        )
    if store is not None:
        check_matches(path, store.attrs, None, attrs["classes"])
    return TrainedHead(
        name=attrs["name"],
        kind=attrs["kind"],
        model=HEADS[attrs["kind"]].from_arrays(arrays),
        classes=attrs["classes"],
        store_fingerprint=attrs["store_fingerprint"],
        hyperparameters=attrs["hyperparameters"],
        val_curve=attrs["val_curve"],
        fit_seconds=float(attrs["fit_seconds"]),
        n_train=int(attrs["n_train"]),
        n_val=int(attrs["n_val"]),
    )
