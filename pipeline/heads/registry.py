"""The head registry: each kind of head, the scikit-learn pipeline params.yaml configures by its own argument names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.core.accelerator import use_cuda
from pipeline.core.errors import PipelineError
from pipeline.heads.estimators import (
    CosineCentroids,
    CosineNeighbors,
    LbfgsLinearSVC,
    TemperatureScaled,
    check_args,
)
from pipeline.heads.linear import path_refit, path_sweep
from pipeline.heads.ridge import ridge_refit, ridge_sweep


class HeadError(PipelineError):
    """A head is misconfigured (unknown kind, bad argument)."""


@dataclass(frozen=True)
class HeadKind:
    """One kind of head: the estimator that params' `args` and `grid` configure (by its own argument
    names), the pipeline around it, and which of its fitted attributes are trainable parameters."""

    estimator: type[BaseEstimator]
    wrap: Callable[[BaseEstimator], Pipeline]  # configured estimator -> unfitted pipeline
    # Fitted attributes of the pipeline's "clf" step (dotted paths) counted by TrainedHead.trainable_params.
    trainable: tuple[str, ...] = ()
    defaults: dict[str, Any] = field(default_factory=dict)  # our defaults; params' args override them
    row_bounded: tuple[str, ...] = ()  # arguments that cannot exceed the number of rows fitted (k of k-NN)
    # Fits a whole grid on one (fit rows, held-out rows) pair at once, reusing work from point to point (one
    # factorisation, a warm-started path, neighbours found once): sweep(kind, fixed args, points, (x, y) to fit,
    # (x, y) held out, n_classes, head name) -> [(fitted pipeline, held-out probabilities), ...] in the order of
    # points (any iterable: selection scores each pair as it comes), calibrated heads calibrated on the held-out
    # rows (pipeline.heads.selection.held_out_proba), or None where it cannot sweep these arguments. Every point's
    # arguments pass `check` first. None: each point is fitted from scratch.
    sweep: Callable | None = None
    # The fitted model keeps rows of the feature store it was trained on (k-NN's reference rows): train_head points it
    # at them in the store (`use_store_rows`), its file holds their row numbers, and loading it needs that store.
    reads_store: bool = False
    # Fits the chosen point on train+val as `sweep` fits it: refit(kind, args, (x, y), head name, start=the grid's
    # model of that point (fitted on other rows: a warm start), temperature=the chosen one or None) -> fitted
    # pipeline, or None where it cannot fit these arguments. None: kind.build(args).fit(x, y).
    refit: Callable | None = None
    # Whether sweep and refit run on CUDA too: they then take device= ("cpu" or "cuda", heads.<name>.device resolved).
    gpu: bool = False

    def arg_names(self) -> list[str]:
        return sorted(self.estimator().get_params(deep=False))

    def check(self, args: dict) -> None:
        """The estimator's own checks of `args`, which its fit runs first; a sweep fits many points at once, so
        each point is checked before any fit (a bad value fails as it would in the point's own fit)."""
        check_args(self.estimator(**{**self.defaults, **args}))

    def build(self, args: dict) -> Pipeline:
        return self.wrap(self.estimator(**{**self.defaults, **args}))


def _scaled(estimator: BaseEstimator) -> Pipeline:
    """logreg: its probabilities are its own. The scaler lets one C grid suit every backbone's feature scale."""
    return Pipeline([("scale", StandardScaler()), ("clf", estimator)])


def _scaled_calibrated(estimator: BaseEstimator) -> Pipeline:
    """ridge and linear_svm: the decision function is no probability, so it is temperature-scaled on held-out rows."""
    return Pipeline([("scale", StandardScaler()), ("clf", TemperatureScaled(estimator))])


def _knn_pipeline(estimator: BaseEstimator) -> Pipeline:
    """knn: cosine k-NN; probabilities are the neighbours' vote fractions. No normaliser: the search normalises
    each block of rows itself, and the reference rows stay the store's own."""
    return Pipeline([("clf", estimator)])


def _knn_sweep(
    kind: HeadKind,
    fixed: dict,
    points: list[dict],
    fit: tuple[np.ndarray, np.ndarray],
    held_out: tuple[np.ndarray, np.ndarray],
    n_classes: int,
    name: str,
) -> list[tuple[Pipeline, np.ndarray]]:
    """knn's grid from one search (one per normalize): the held-out rows' neighbours among the fit rows are found
    once, for the largest k of the grid, and every point (k, weighting) votes with the first k of them. The
    probabilities are those of each point's own predict_proba: the exact search's first k neighbours are its k
    nearest, in the same order."""
    use_cuda(fixed.get("device", "auto"), f"heads.{name}.device")  # a missing GPU is named by its key, up front
    models = []
    for point in points:
        args = {**fixed, **point}
        try:
            models.append(kind.build(args).fit(*fit))
        except (TypeError, ValueError) as err:  # as pipeline.heads.selection fits a point
            raise HeadError(f"heads.{name}: {kind.estimator.__name__} could not be fitted with {args}: {err}") from err
    found = {}  # per normalize: each point's own search has that point's neighbours
    for normalize in dict.fromkeys(m[-1].normalize for m in models):
        largest = max((m for m in models if m[-1].normalize == normalize), key=lambda m: m[-1].n_neighbors)[-1]
        found[normalize] = largest.neighbors(held_out[0])
    fitted = []
    for model in models:
        full = np.zeros((len(held_out[0]), n_classes))  # as pipeline.heads.trained.full_proba expands them
        full[:, model.classes_] = model[-1].proba_from(*found[model[-1].normalize])
        fitted.append((model, full / full.sum(axis=1, keepdims=True)))
    return fitted


def _centroid_pipeline(estimator: BaseEstimator) -> Pipeline:
    """centroid: cosine to each class's mean direction (scale-free, no scaler), temperature-scaled on held-out rows."""
    return Pipeline([("clf", TemperatureScaled(estimator))])


# Adding a kind of head is one entry here; `trainable` is explained in TrainedHead.trainable_params. Its steps
# must predict from public fitted attributes alone: save_head writes only those (pipeline.heads.persistence).
HEADS: dict[str, HeadKind] = {
    "logreg": HeadKind(
        LogisticRegression,
        _scaled,
        trainable=("coef_", "intercept_"),
        defaults={"max_iter": 1000},
        sweep=path_sweep,
        refit=path_refit,
        gpu=True,
    ),
    "ridge": HeadKind(
        RidgeClassifier,
        _scaled_calibrated,
        trainable=("estimator_.coef_", "estimator_.intercept_", "temperature_"),
        sweep=ridge_sweep,
        refit=ridge_refit,
    ),
    "linear_svm": HeadKind(
        LbfgsLinearSVC,
        _scaled_calibrated,
        trainable=("estimator_.coef_", "estimator_.intercept_", "temperature_"),
        sweep=path_sweep,
        refit=path_refit,
        gpu=True,
    ),
    "knn": HeadKind(CosineNeighbors, _knn_pipeline, row_bounded=("n_neighbors",), sweep=_knn_sweep, reads_store=True),
    "centroid": HeadKind(CosineCentroids, _centroid_pipeline, trainable=("estimator_.centroids_", "temperature_")),
}
