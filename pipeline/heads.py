"""Heads on cached features: a registry of scikit-learn pipelines, selection on val, plain-array saving."""

from __future__ import annotations

import itertools
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.metrics import accuracy_score, log_loss
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler, normalize
from sklearn.utils import check_scalar
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_is_fitted, check_X_y

from pipeline.config import HeadParams
from pipeline.errors import PipelineError
from pipeline.store import FeatureStore, StoreError, check_matches, load_arrays, save_arrays

log = logging.getLogger(__name__)


class HeadError(PipelineError):
    """A head is misconfigured (unknown kind, bad argument)."""


# --- estimators scikit-learn does not have ----------------------------------------------------------


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The T > 0 minimising the mean log loss of softmax(logits / T) against column indices `targets`.

    The loss is convex in 1/T, hence unimodal in log T: a bounded 1-D search finds it. The bounds (1/1000
    to 1000 times the logits' spread) only matter when the rows are perfectly separated, where the loss
    keeps falling as T goes to 0: T then stops at the lower bound and the probabilities saturate.
    """
    logits = np.asarray(logits, dtype=np.float64)
    rows = np.arange(len(targets))
    spread = float(np.log(np.std(logits) or 1.0))

    def mean_log_loss(log_t: float) -> float:
        return -float(np.mean(log_softmax(logits / np.exp(log_t), axis=1)[rows, targets]))

    best = minimize_scalar(
        mean_log_loss, bounds=(spread - 7.0, spread + 7.0), method="bounded", options={"xatol": 1e-6}
    )
    return float(np.exp(best.x))


class TemperatureScaled(ClassifierMixin, BaseEstimator):
    """Probabilities for a classifier that only has a decision function: softmax(decision_function / T).

    `fit` trains a clone of `estimator` and sets T to `temperature` (1 when None). `calibrate` then fits T
    on held-out rows by minimising their log loss (temperature scaling, Guo et al. 2017). Dividing every
    score by one positive number never changes the predicted class, only how confident it is.
    """

    def __init__(self, estimator: BaseEstimator, temperature: float | None = None):
        self.estimator = estimator
        self.temperature = temperature

    def fit(self, X: np.ndarray, y: np.ndarray) -> TemperatureScaled:
        self.estimator_ = clone(self.estimator).fit(X, y)
        self.classes_ = self.estimator_.classes_
        self.n_features_in_ = self.estimator_.n_features_in_
        self.temperature_ = 1.0 if self.temperature is None else float(self.temperature)
        return self

    def calibrate(self, X: np.ndarray, y: np.ndarray) -> TemperatureScaled:
        """Fit T on (X, y); rows of a class the estimator never saw cannot be scored and are left out."""
        known = np.isin(y, self.classes_)
        if not known.any():
            log.warning("no calibration rows of a known class: temperature left at %s", self.temperature_)
            return self
        targets = np.searchsorted(self.classes_, y[known])
        self.temperature_ = fit_temperature(self.decision_function(X[known]), targets)
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """One score per class, [N, n_classes]."""
        check_is_fitted(self)
        scores = np.asarray(self.estimator_.decision_function(X), dtype=np.float64)
        # A two-class estimator returns one score, the logit of classes_[1] against classes_[0].
        return np.column_stack([np.zeros_like(scores), scores]) if scores.ndim == 1 else scores

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return softmax(self.decision_function(X) / self.temperature_, axis=1)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.decision_function(X).argmax(axis=1)]


class LbfgsLinearSVC(ClassifierMixin, BaseEstimator):
    """LinearSVC's model and objective, minimised by L-BFGS over all classes at once.

    For each class k against the rest (one-vs-rest; a single problem for two classes), the objective of
    LinearSVC (liblinear's L2-regularised squared hinge, primal), with the bias as an extra feature of
    value s = `intercept_scaling` and so regularised too, as in liblinear:

        0.5 * (|w_k|^2 + v_k^2) + sum_i c_ik * max(0, 1 - y_ik * (x_i . w_k + s * v_k))^2,  intercept = s * v_k

    where c_ik = C * class_weight[k] for the rows of class k and C for the others (liblinear's rule; for
    two classes each class has its own weight). The arguments it shares with LinearSVC (C, class_weight,
    fit_intercept, intercept_scaling, tol, max_iter) mean the same, and so do coef_, intercept_, classes_.
    It stops when the largest gradient entry is below `tol` times that at w = 0.

    Written by hand for speed: liblinear solves the one-vs-rest problems one after another with scalar
    loops, which took about four minutes for a single value of C on 35,000 x 1,280 features and 100
    classes (2 shared cores). Here each L-BFGS step costs two float32 matrix products for all classes
    together (BLAS, every core): a five-point grid plus the refit took 40 s on the same problem. The
    minimiser is the same (tests compare the coefficients with LinearSVC's).
    """

    def __init__(
        self,
        C: float = 1.0,
        *,
        class_weight: dict | str | None = None,
        fit_intercept: bool = True,
        intercept_scaling: float = 1.0,
        tol: float = 1e-4,
        max_iter: int = 1000,
    ):
        self.C = C
        self.class_weight = class_weight
        self.fit_intercept = fit_intercept
        self.intercept_scaling = intercept_scaling
        self.tol = tol
        self.max_iter = max_iter

    def fit(self, X: np.ndarray, y: np.ndarray) -> LbfgsLinearSVC:
        check_scalar(self.C, "C", Real, min_val=0.0, include_boundaries="neither")
        check_scalar(self.tol, "tol", Real, min_val=0.0, include_boundaries="neither")
        check_scalar(self.max_iter, "max_iter", Integral, min_val=1)
        X, y = check_X_y(X, y, dtype=[np.float32, np.float64], order="C")
        check_classification_targets(y)
        self.classes_, y_index = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"LbfgsLinearSVC needs at least two classes; got {self.classes_.tolist()}")
        self.n_features_in_ = X.shape[1]
        signs, costs = self._problems(y, y_index, X.dtype)
        n_features, n_problems = X.shape[1], signs.shape[1]
        scaling = float(self.intercept_scaling) if self.fit_intercept else 0.0

        def loss_and_gradient(theta: np.ndarray) -> tuple[float, np.ndarray]:
            w, v = theta[:-n_problems].reshape(n_features, n_problems), theta[-n_problems:]
            slack = 1.0 - signs * (X @ w.astype(X.dtype) + (scaling * v).astype(X.dtype))
            np.maximum(slack, 0.0, out=slack)
            weighted = costs * slack
            loss = 0.5 * float(theta @ theta) + float(np.sum(weighted * slack, dtype=np.float64))
            d_scores = -2.0 * signs * weighted
            grad_w = w + X.T @ d_scores
            grad_v = v + scaling * d_scores.sum(axis=0, dtype=np.float64)
            return loss, np.concatenate([grad_w.ravel(), grad_v])

        theta0 = np.zeros((n_features + 1) * n_problems)
        scale = np.abs(loss_and_gradient(theta0)[1]).max()
        result = minimize(
            loss_and_gradient,
            theta0,
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": self.max_iter, "gtol": self.tol * scale},
        )
        if result.nit >= self.max_iter:
            warnings.warn(f"LbfgsLinearSVC did not converge in {self.max_iter} iterations", ConvergenceWarning, 2)
        self.n_iter_ = int(result.nit)
        w, v = result.x[:-n_problems].reshape(n_features, n_problems), result.x[-n_problems:]
        self.coef_ = np.ascontiguousarray(w.T)
        self.intercept_ = scaling * v
        return self

    def _problems(self, y: np.ndarray, y_index: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """Targets (+1 / -1) and per-row costs, [N, n_problems]: one problem, or one per class."""
        n_classes = len(self.classes_)
        weights = np.ones(n_classes)
        if self.class_weight is not None:  # a dict is keyed by the labels themselves, as in LinearSVC
            weights = compute_class_weight(self.class_weight, classes=self.classes_, y=y)
        if n_classes == 2:
            positive = (y_index == 1)[:, None]
            costs = np.where(positive, weights[1], weights[0])
        else:
            positive = y_index[:, None] == np.arange(n_classes)
            costs = np.where(positive, weights, 1.0)
        return np.where(positive, 1.0, -1.0).astype(dtype), (self.C * costs).astype(dtype)

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self)
        scores = check_array(X) @ self.coef_.T + self.intercept_
        return scores.ravel() if scores.shape[1] == 1 else scores

    def predict(self, X: np.ndarray) -> np.ndarray:
        scores = self.decision_function(X)
        return self.classes_[(scores > 0).astype(int) if scores.ndim == 1 else scores.argmax(axis=1)]


class CosineCentroids(ClassifierMixin, BaseEstimator):
    """Nearest class mean by cosine similarity; decision_function = cosine to each class's mean direction.

    Hand-written because NearestCentroid ranks by euclidean distance to the raw means and has no cosine
    scores. The means are taken over L2-normalised rows, so every image weighs the same whatever its norm.
    """

    def fit(self, X: np.ndarray, y: np.ndarray) -> CosineCentroids:
        X, y = check_X_y(X, y, dtype=[np.float64, np.float32])
        check_classification_targets(y)
        self.classes_, y_index = np.unique(y, return_inverse=True)
        self.n_features_in_ = X.shape[1]
        unit = normalize(X)
        means = np.stack([unit[y_index == k].mean(axis=0, dtype=np.float64) for k in range(len(self.classes_))])
        self.centroids_ = normalize(means)
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self)
        return normalize(check_array(X, dtype=[np.float64, np.float32])) @ self.centroids_.T

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.decision_function(X).argmax(axis=1)]


# --- the registry -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadKind:
    """One kind of head: the estimator that params' `args` and `grid` configure (by its own argument
    names), the pipeline around it, and how its learned state becomes plain arrays and back."""

    estimator: type[BaseEstimator]
    wrap: Callable[[BaseEstimator], Pipeline]  # configured estimator -> unfitted pipeline
    to_arrays: Callable[[Pipeline], dict[str, np.ndarray]]
    restore: Callable[[Pipeline, dict[str, np.ndarray]], None]  # learned state into a freshly built pipeline
    trainable: tuple[str, ...]  # the arrays counted as trainable parameters (see TrainedHead.trainable_params)
    defaults: dict[str, Any] = field(default_factory=dict)  # our defaults; params' args override them
    row_bounded: tuple[str, ...] = ()  # arguments that cannot exceed the number of rows fitted (k of k-NN)

    def arg_names(self) -> list[str]:
        return sorted(self.estimator().get_params(deep=False))

    def build(self, args: dict) -> Pipeline:
        return self.wrap(self.estimator(**{**self.defaults, **args}))

    def from_arrays(self, arrays: dict[str, np.ndarray], hyperparameters: dict) -> Pipeline:
        model = self.build(hyperparameters)
        self.restore(model, arrays)
        return model


def _scaler_arrays(scaler: StandardScaler) -> dict[str, np.ndarray]:
    return {"scaler_mean": scaler.mean_, "scaler_scale": scaler.scale_}


def _restore_scaler(scaler: StandardScaler, a: dict[str, np.ndarray]) -> None:
    scaler.mean_, scaler.scale_ = a["scaler_mean"], a["scaler_scale"]
    scaler.var_ = scaler.scale_**2
    scaler.n_features_in_ = len(scaler.mean_)


def _restore_linear(clf: BaseEstimator, a: dict[str, np.ndarray]) -> None:
    clf.coef_, clf.intercept_ = a["coef"], a["intercept"]
    clf.n_features_in_ = clf.coef_.shape[-1]


def _calibrated_arrays(step: TemperatureScaled, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**state, "classes": step.classes_, "temperature": np.float64(step.temperature_)}


def _restore_calibrated(step: TemperatureScaled, a: dict[str, np.ndarray], restore_inner: Callable) -> None:
    step.estimator_ = clone(step.estimator)
    restore_inner(step.estimator_, a)
    step.classes_, step.temperature_ = a["classes"], float(a["temperature"])
    step.n_features_in_ = step.estimator_.n_features_in_


# logreg: StandardScaler + multinomial logistic regression (lbfgs); its probabilities are its own.


def _scaled(estimator: BaseEstimator) -> Pipeline:
    return Pipeline([("scale", StandardScaler()), ("clf", estimator)])


def _logreg_to_arrays(model: Pipeline) -> dict[str, np.ndarray]:
    clf = model.named_steps["clf"]
    return {
        **_scaler_arrays(model.named_steps["scale"]),
        "coef": clf.coef_,
        "intercept": clf.intercept_,
        "classes": clf.classes_,
    }


def _logreg_restore(model: Pipeline, a: dict[str, np.ndarray]) -> None:
    _restore_scaler(model.named_steps["scale"], a)
    _restore_linear(model.named_steps["clf"], a)
    model.named_steps["clf"].classes_ = a["classes"]


# ridge and linear_svm: StandardScaler (one C / alpha grid then suits every backbone's feature scale) and
# a linear classifier whose decision function is not a probability: temperature-scaled on val.


def _scaled_calibrated(estimator: BaseEstimator) -> Pipeline:
    return Pipeline([("scale", StandardScaler()), ("clf", TemperatureScaled(estimator))])


def _linear_calibrated_to_arrays(model: Pipeline) -> dict[str, np.ndarray]:
    step = model.named_steps["clf"]
    state = {"coef": step.estimator_.coef_, "intercept": np.asarray(step.estimator_.intercept_)}
    return {**_scaler_arrays(model.named_steps["scale"]), **_calibrated_arrays(step, state)}


def _linear_calibrated_restore(model: Pipeline, a: dict[str, np.ndarray]) -> None:
    _restore_scaler(model.named_steps["scale"], a)
    _restore_calibrated(model.named_steps["clf"], a, _restore_linear)


# knn: cosine k-NN on L2-normalised rows; probabilities are the neighbours' vote fractions (weighted by
# inverse distance with weights: distance). Fitting only stores the rows, so the file keeps them.


def _knn_pipeline(estimator: BaseEstimator) -> Pipeline:
    # Normalised first so that the stored reference rows are the unit vectors the neighbours are found among.
    return Pipeline([("normalize", Normalizer()), ("clf", estimator)])


def _knn_to_arrays(model: Pipeline) -> dict[str, np.ndarray]:
    clf = model.named_steps["clf"]
    # The fitted rows live in private attributes; the save/load round-trip test guards them.
    return {"reference_features": clf._fit_X, "reference_labels": clf.classes_[clf._y], "classes": clf.classes_}


def _knn_restore(model: Pipeline, a: dict[str, np.ndarray]) -> None:
    reference = a["reference_features"]
    model.named_steps["normalize"].fit(reference[:1])  # stateless; fit only records the width
    # The saved rows are already normalised: refit the neighbour search on them as they are, bit for bit.
    model.named_steps["clf"].fit(reference, a["reference_labels"])


# centroid: cosine to each class's mean direction, temperature-scaled on val.


def _centroid_pipeline(estimator: BaseEstimator) -> Pipeline:
    return Pipeline([("clf", TemperatureScaled(estimator))])


def _centroid_to_arrays(model: Pipeline) -> dict[str, np.ndarray]:
    step = model.named_steps["clf"]
    return _calibrated_arrays(step, {"centroids": step.estimator_.centroids_})


def _restore_centroids(clf: CosineCentroids, a: dict[str, np.ndarray]) -> None:
    clf.centroids_, clf.classes_ = a["centroids"], a["classes"]
    clf.n_features_in_ = clf.centroids_.shape[1]


def _centroid_restore(model: Pipeline, a: dict[str, np.ndarray]) -> None:
    _restore_calibrated(model.named_steps["clf"], a, _restore_centroids)


HEADS: dict[str, HeadKind] = {
    "logreg": HeadKind(
        LogisticRegression,
        _scaled,
        _logreg_to_arrays,
        _logreg_restore,
        trainable=("coef", "intercept"),
        defaults={"max_iter": 1000},
    ),
    "ridge": HeadKind(
        RidgeClassifier,
        _scaled_calibrated,
        _linear_calibrated_to_arrays,
        _linear_calibrated_restore,
        trainable=("coef", "intercept", "temperature"),
    ),
    "linear_svm": HeadKind(
        LbfgsLinearSVC,
        _scaled_calibrated,
        _linear_calibrated_to_arrays,
        _linear_calibrated_restore,
        trainable=("coef", "intercept", "temperature"),
    ),
    "knn": HeadKind(
        KNeighborsClassifier,
        _knn_pipeline,
        _knn_to_arrays,
        _knn_restore,
        trainable=(),
        # Cosine is no tree metric; brute force (blocked matrix products) is the fast way in 1,000+ dimensions.
        defaults={"metric": "cosine", "algorithm": "brute"},
        row_bounded=("n_neighbors",),
    ),
    "centroid": HeadKind(
        CosineCentroids,
        _centroid_pipeline,
        _centroid_to_arrays,
        _centroid_restore,
        trainable=("centroids", "temperature"),
    ),
}


# --- selection on val, refit, save and load ---------------------------------------------------------


@dataclass
class TrainedHead:
    name: str
    kind: str
    model: Pipeline
    classes: list[str]
    store_fingerprint: str
    hyperparameters: dict  # every argument of the estimator that we set: defaults, args, chosen grid values
    val_curve: list[dict]  # one record per grid point: its values, val accuracy, val log loss (temperature)
    fit_seconds: float
    n_train: int
    n_val: int

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Probabilities for every class of the store, columns in class-index order."""
        return _full_proba(self.model, features, len(self.classes))

    @property
    def trainable_params(self) -> int:
        """Numbers fitted to the data: coefficients and intercepts of the linear heads, the class means of
        centroid, plus 1 for a temperature fitted on val. Scaler statistics are not counted (they are not
        trained), nor k-NN's stored rows: its training only keeps the embeddings, so it has 0."""
        arrays = HEADS[self.kind].to_arrays(self.model)
        return int(sum(np.size(arrays[k]) for k in HEADS[self.kind].trainable))


def check_head_params(name: str, params: HeadParams) -> HeadKind:
    """The head's kind, once its args and grid are known arguments of its estimator; errors name the key."""
    if params.kind not in HEADS:
        raise HeadError(f"heads.{name}.kind: unknown head '{params.kind}'; valid: {', '.join(HEADS)}")
    kind = HEADS[params.kind]
    valid = kind.arg_names()
    for section, keys in (("args", params.args), ("grid", params.grid)):
        for key in keys:
            if key not in valid:
                hint = " (it does not apply: this head has no loss to weight)" if key == "class_weight" else ""
                raise HeadError(
                    f"heads.{name}.{section}.{key}: not an argument of {kind.estimator.__name__}, the "
                    f"'{params.kind}' head{hint}; valid: {', '.join(valid) or 'none'}"
                )
    for key, values in params.grid.items():
        if not values:
            raise HeadError(f"heads.{name}.grid.{key}: empty list; give at least one value or remove the key")
        if key in params.args:
            raise HeadError(f"heads.{name}: '{key}' is both in args and in grid; keep one")
    return kind


def train_head(store: FeatureStore, name: str, params: HeadParams) -> TrainedHead:
    """Choose the grid point with the best val accuracy (ties: lower val log loss, then the first in
    ascending grid order), then refit it on train+val (`params.refit_on_train_val`). The test split is
    never read. Heads without probabilities of their own get a temperature fitted on val for each grid
    point with the model trained on train; the chosen point's temperature is kept for the refit model.
    """
    kind = check_head_params(name, params)
    x_train, y_train = store.subset("train")
    x_val, y_val = store.subset("val")
    if len(y_train) == 0 or len(y_val) == 0:
        raise HeadError(
            f"heads.{name}: the store has {len(y_train)} train and {len(y_val)} val rows; selecting on val "
            "needs both (see prepare.val_fraction)"
        )
    n_classes = len(store.classes)
    fixed = {**kind.defaults, **params.args}
    if "random_state" in kind.arg_names() and "random_state" not in fixed:
        fixed["random_state"] = params.seed
    start = time.perf_counter()
    curve, best, best_model = [], None, None
    for point in _grid_points(kind, params.grid):
        if _too_big(kind, {**fixed, **point}, len(y_train), name):
            continue
        model = _fit(kind, {**fixed, **point}, x_train, y_train, name)
        record = {**point, **_val_scores(model, x_val, y_val, n_classes)}
        curve.append(record)
        if best is None or _rank(record) > _rank(best):
            best, best_model = record, model
    if best is None:
        bounded = ", ".join(kind.row_bounded)
        raise HeadError(f"heads.{name}.grid: every value of {bounded} exceeds the {len(y_train)} train rows")
    chosen = {k: best[k] for k in params.grid}
    model = best_model
    if params.refit_on_train_val:
        x_fit, y_fit = store.subset("train", "val")
        model = _fit(kind, {**fixed, **chosen}, x_fit, y_fit, name, temperature=best.get("temperature"))
    fit_seconds = time.perf_counter() - start
    log.info("head %s: chose %s (val accuracy %.4f) in %.1fs", name, chosen, best["val_accuracy"], fit_seconds)
    return TrainedHead(
        name=name,
        kind=params.kind,
        model=model,
        classes=store.classes,
        store_fingerprint=store.fingerprint,
        hyperparameters={**fixed, **chosen},
        val_curve=curve,
        fit_seconds=fit_seconds,
        n_train=len(y_train),
        n_val=len(y_val),
    )


def _grid_points(kind: HeadKind, grid: dict[str, list[float]]) -> list[dict]:
    """Every combination, each axis ascending (so the curve plots in order)."""
    keys = sorted(grid)
    axes = [sorted(_as_argument(kind, k, v) for v in grid[k]) for k in keys]
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*axes)]


def _as_argument(kind: HeadKind, key: str, value: float) -> float | int:
    # params.yaml grids are read as floats; an integer argument (n_neighbors) wants 5, not 5.0.
    default = kind.estimator().get_params(deep=False)[key]
    is_int = isinstance(default, int) and not isinstance(default, bool)
    return int(value) if is_int and float(value).is_integer() else value


def _too_big(kind: HeadKind, point: dict, n_rows: int, name: str) -> bool:
    for key in kind.row_bounded:
        if key in point and point[key] > n_rows:
            log.warning("heads.%s.grid.%s: %s exceeds the %d train rows; skipped", name, key, point[key], n_rows)
            return True
    return False


def _rank(record: dict) -> tuple[float, float]:
    return record["val_accuracy"], -record["val_log_loss"]


def _fit(
    kind: HeadKind, args: dict, x: np.ndarray, y: np.ndarray, name: str, temperature: float | None = None
) -> Pipeline:
    model = kind.build(args)
    if temperature is not None:
        model.set_params(clf__temperature=temperature)
    try:
        return model.fit(x, y)
    except (TypeError, ValueError) as err:  # a bad value (scikit-learn's InvalidParameterError is both)
        raise HeadError(f"heads.{name}: {kind.estimator.__name__} could not be fitted with {args}: {err}") from err


def _val_scores(model: Pipeline, x_val: np.ndarray, y_val: np.ndarray, n_classes: int) -> dict[str, float]:
    """Val accuracy and log loss; a calibrated head first fits its temperature on these rows."""
    step = model.steps[-1][1]
    extra = {}
    if isinstance(step, TemperatureScaled):
        x = x_val
        for _, transform in model.steps[:-1]:
            x = transform.transform(x)
        step.calibrate(x, y_val)
        extra["temperature"] = step.temperature_
    proba = _full_proba(model, x_val, n_classes)
    return {
        "val_accuracy": float(accuracy_score(y_val, proba.argmax(1))),
        "val_log_loss": float(log_loss(y_val, proba, labels=np.arange(n_classes))),
        **extra,
    }


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
        model=HEADS[attrs["kind"]].from_arrays(arrays, attrs["hyperparameters"]),
        classes=attrs["classes"],
        store_fingerprint=attrs["store_fingerprint"],
        hyperparameters=attrs["hyperparameters"],
        val_curve=attrs["val_curve"],
        fit_seconds=float(attrs["fit_seconds"]),
        n_train=int(attrs["n_train"]),
        n_val=int(attrs["n_val"]),
    )
