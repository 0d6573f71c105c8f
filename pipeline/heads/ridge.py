"""Ridge's grid from one factorisation: every alpha of RidgeClassifier from one eigendecomposition of the
standardised Gram matrix, accumulated from the raw rows a block at a time (no standardised copy of the features);
each point is the pipeline the registry builds, with the attributes RidgeClassifier's own fit gives."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
from scipy.linalg import LinAlgWarning, eigh
from sklearn.linear_model import RidgeClassifier
from sklearn.pipeline import Pipeline
from sklearn.utils.class_weight import compute_class_weight

from pipeline.heads.linear import Rows, fitted_pipeline, linear_estimator, proba_from_scores, supports
from pipeline.heads.objectives import fitted_scaler, folded, row_blocks, scores

# Rows per block of the Gram matrix: its float64 copy of a block is 4096 x features x 8 bytes.
GRAM_ROWS = 4096


class IllConditioned(LinAlgWarning):
    """A ridge point's system is numerically singular (alpha tiny against the Gram matrix's largest eigenvalue, and
    features nearly collinear): its solution may be inexact. `point` names the grid point."""

    def __init__(self, point: dict):
        super().__init__(f"ill-conditioned least squares at {point}")
        self.point = point


class RidgeGram:
    """RidgeClassifier's least squares on standardised rows, (Z'WZ + alpha I) coef = Z'WY (centred by their
    weighted means), for every alpha from one eigendecomposition of Z'WZ. Z'WZ comes from the raw rows: X'WX
    accumulated in float64 a block at a time about the scaler's mean, then centred and scaled, never from a
    standardised copy of X. W: the rows' class weights."""

    def __init__(self, estimator: RidgeClassifier, fit: Rows):
        x, y = fit
        self.classes, y_index = np.unique(y, return_inverse=True)
        self.scaler = fitted_scaler(x)
        weights = np.ones(len(self.classes))
        if estimator.class_weight is not None:
            weights = compute_class_weight(estimator.class_weight, classes=self.classes, y=y)
        row_weight = None if np.all(weights == 1.0) else weights[y_index]
        n_outputs = 1 if len(self.classes) == 2 else len(self.classes)
        gram, cross, offset, target_sum, total = self._sums(x, self.scaler.mean_, y_index, n_outputs, row_weight)
        # Centred on the weighted means (the offsets from the scaler's mean), then standardised.
        scale = self.scaler.scale_
        gram = (gram - np.outer(offset, offset) / total) / np.outer(scale, scale)
        cross = (cross - np.outer(offset, target_sum) / total) / scale[:, None]
        self.eigenvalues, self.eigenvectors = eigh(gram)
        self.eigenvalues = np.maximum(self.eigenvalues, 0.0)  # a Gram matrix has none below 0; rounding gives -1e-13
        self.projected = self.eigenvectors.T @ cross
        self.mean_row, self.mean_target = offset / total / scale, target_sum / total

    @staticmethod
    def _sums(
        x: np.ndarray, mean: np.ndarray, y_index: np.ndarray, n_outputs: int, row_weight: np.ndarray | None
    ) -> tuple:
        """sum_i w_i (x_i - m)(x_i - m)', sum_i w_i (x_i - m) y_i', sum_i w_i (x_i - m), sum_i w_i y_i, sum_i w_i;
        m the scaler's mean, y_i = +-1 per output (RidgeClassifier's targets)."""
        n_features = x.shape[1]
        gram, cross = np.zeros((n_features, n_features)), np.zeros((n_features, n_outputs))
        offset, target_sum, total = np.zeros(n_features), np.zeros(n_outputs), 0.0
        for block in row_blocks(len(x), GRAM_ROWS):
            rows = x[block].astype(np.float64)
            rows -= mean
            labels = y_index[block]
            targets = (labels[:, None] == (np.arange(n_outputs) + (n_outputs == 1))).astype(np.float64) * 2.0 - 1.0
            if row_weight is not None:
                w = row_weight[block]
                offset += w @ rows
                target_sum += w @ targets
                total += float(w.sum())
                root = np.sqrt(w)[:, None]
                rows *= root
                targets *= root
            else:
                offset += rows.sum(axis=0)
                target_sum += targets.sum(axis=0)
                total += len(rows)
            gram += rows.T @ rows  # numpy calls BLAS's syrk for a.T @ a: half the products
            cross += rows.T @ targets
        return gram, cross, offset, target_sum, total

    def coefficients(self, alpha: float) -> tuple[np.ndarray, np.ndarray, bool]:
        """(coef_ [P, d], intercept_ [P], whether the system is numerically singular) at alpha."""
        inverse = 1.0 / (self.eigenvalues + alpha)
        coef = (self.eigenvectors @ (self.projected * inverse[:, None])).T
        intercept = self.mean_target - coef @ self.mean_row
        largest, smallest = self.eigenvalues[-1] + alpha, self.eigenvalues[0] + alpha
        singular = smallest <= len(self.eigenvalues) * np.finfo(float).eps * largest
        return coef, intercept, bool(singular)

    def fit(self, model: Pipeline, alpha: float, point: dict, temperature: float | None = None) -> Pipeline:
        coef, intercept, singular = self.coefficients(alpha)
        if singular:
            warnings.warn(IllConditioned(point), stacklevel=2)
        return fitted_pipeline(model, self.scaler, self.classes, coef, intercept, None, temperature)


def ridge_sweep(
    kind: Any, fixed: dict, points: list[dict], fit: Rows, out: Rows, n_classes: int, name: str, **_: Any
) -> Iterator[tuple[Pipeline, np.ndarray]] | None:
    """HeadKind.sweep of ridge: every alpha from one Gram matrix and its eigendecomposition, O(d^2 K) each. None
    where the arguments ask for another solver (positive, no intercept, an iterative solver) or the grid varies
    more than alpha."""
    models = [kind.build({**fixed, **point}) for point in points]
    if not all(set(point) <= {"alpha"} for point in points) or not all(supports(linear_estimator(m)) for m in models):
        return None
    if len(np.unique(fit[1])) < 2:
        return None
    return _ridge_walk(models, points, fit, out, n_classes)


def _ridge_walk(models: list[Pipeline], points: list[dict], fit: Rows, out: Rows, n_classes: int) -> Iterator:
    gram = RidgeGram(linear_estimator(models[0]), fit)
    for model, point in zip(models, points, strict=True):
        fitted = gram.fit(model, linear_estimator(model).alpha, point)
        a, c = folded(np.atleast_2d(fitted[-1].estimator_.coef_), fitted[-1].estimator_.intercept_,
                      gram.scaler.mean_, gram.scaler.scale_)  # fmt: skip
        yield fitted, proba_from_scores(fitted, scores(out[0], a, c), out[1], n_classes)


def ridge_refit(
    kind: Any,
    args: dict,
    fit: Rows,
    name: str,
    *,
    start: Pipeline | None = None,
    temperature: float | None = None,
    **_: Any,
) -> Pipeline | None:
    """HeadKind.refit of ridge: the chosen alpha on (x, y), by the sweep's solver (`start` is of no use to it)."""
    model = kind.build(args)
    if not supports(linear_estimator(model)) or len(np.unique(fit[1])) < 2:
        return None
    return RidgeGram(linear_estimator(model), fit).fit(model, linear_estimator(model).alpha, args, temperature)
