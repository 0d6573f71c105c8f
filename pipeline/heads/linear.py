"""The linear heads' grids as paths: every logreg and linear_svm C by L-BFGS warm-started from the previous C (ridge's
every alpha from one eigendecomposition: pipeline.heads.ridge), on the CPU (numpy) or on CUDA (torch). Features are
read as they are, never copied or standardised; each point gives the pipeline the registry builds, with the fitted
attributes its own fit gives, so head files, scoring, export and the fine-tuning warm start are unchanged."""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import softmax
from sklearn.base import BaseEstimator, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.class_weight import compute_class_weight

from pipeline.heads.estimators import LbfgsLinearSVC, TemperatureScaled, check_args, scores_per_class
from pipeline.heads.objectives import (
    Loss,
    Objective,
    Preconditioner,
    Stopping,
    blocks,
    fitted_scaler,
    folded,
    minimise,
    preconditioned,
    scores,
    unfolded,
)

log = logging.getLogger(__name__)

Rows = tuple[np.ndarray, np.ndarray]  # (features, labels)

# `device: auto` runs on CUDA when the work of one pass over the rows (rows x features x outputs multiply-adds)
# reaches this: below it, starting torch and CUDA costs more than the whole CPU fit.
WORTH_A_GPU = 10**10


# --- where the solvers run ---------------------------------------------------------------------------------------


def nvidia_present() -> bool:
    """Whether this machine has an NVIDIA GPU, asked of the driver's files: importing torch to ask costs seconds,
    which a head stage on a CPU machine must not spend."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or Path("/dev/nvidia0").exists()


def solver_device(requested: str, option: str, work: int) -> str:
    """'cuda' (torch) or 'cpu' (numpy) for a head's `device` setting (`option` names it in errors). auto: CUDA when
    the driver is present and the work (`WORTH_A_GPU`) is worth starting it; cuda without CUDA is an error. torch is
    imported only where CUDA is asked for or present (pipeline.core.device decides, as for every torch device)."""
    if requested == "cpu" or (requested == "auto" and (work < WORTH_A_GPU or not nvidia_present())):
        return "cpu"
    from pipeline.core.device import resolve_device  # imports torch

    device = resolve_device("cuda" if requested == "cuda" else "auto", option)
    return "cuda" if device.type == "cuda" else "cpu"


class NumpySolver:
    """The CPU solver: scipy's L-BFGS-B on objectives.Objective (float32 products, float64 sums). `preconditioner`:
    one built for these rows (or a superset of them); by default decided at the first fit, kept for every C."""

    def __init__(
        self,
        x: np.ndarray,
        loss: Loss,
        mean: np.ndarray,
        scale: np.ndarray,
        take: np.ndarray | None = None,
        preconditioner: Preconditioner | None | bool = False,
    ):
        self.objective = Objective(x, loss, mean, scale, take)
        self.preconditioner = preconditioner

    def minimise(self, C: float, start: np.ndarray, stopping: Stopping) -> tuple[np.ndarray, int]:
        if self.preconditioner is False:
            self.preconditioner = preconditioned(self.objective)
        result = minimise(self.objective, C, start, stopping, self.preconditioner)
        return result.x, int(result.nit)

    def value(self, theta: np.ndarray, C: float) -> float:
        return self.objective(theta, C)[0]

    def gradient_scale(self, C: float) -> float:
        return self.objective.gradient_scale(C)

    def scores(self, x: np.ndarray, a: np.ndarray, c: np.ndarray) -> np.ndarray:
        return scores(x, a, c)


def make_solver(
    device: str,
    x: np.ndarray,
    loss: Loss,
    mean: np.ndarray,
    scale: np.ndarray,
    take: np.ndarray | None = None,
    preconditioner: Preconditioner | None | bool = False,
) -> Any:
    """The solver of `loss` on x's rows `take` (None: all): numpy reads them a block at a time, torch copies them to
    the GPU (it needs no preconditioner)."""
    if device == "cpu":
        return NumpySolver(x, loss, mean, scale, take, preconditioner)
    from pipeline.heads.linear_torch import TorchSolver  # imports torch: CUDA was asked for and is there

    return TorchSolver(device, x if take is None else x[take], loss, mean, scale)


# --- fitted pipelines from coefficients ----------------------------------------------------------------------------


def supports(estimator: BaseEstimator) -> bool:
    """Whether the solvers here minimise this estimator's objective exactly as configured; the others are fitted
    by their own fit, point by point."""
    params = estimator.get_params(deep=False)
    if isinstance(estimator, LbfgsLinearSVC):
        return True
    if isinstance(estimator, RidgeClassifier):
        return params["fit_intercept"] and not params["positive"] and params["solver"] in ("auto", "cholesky", "svd")
    if isinstance(estimator, LogisticRegression):
        return (
            params["solver"] == "lbfgs"
            and params["fit_intercept"]
            and not params["dual"]
            and params["penalty"] in ("deprecated", "l2")
            and params["l1_ratio"] in (0, None)
            and np.isfinite(params["C"])
        )
    return False


def linear_estimator(model: Pipeline) -> BaseEstimator:
    """The linear estimator of a head's pipeline (inside TemperatureScaled for ridge and linear_svm)."""
    step = model.steps[-1][1]
    return step.estimator if isinstance(step, TemperatureScaled) else step


def fitted_pipeline(
    model: Pipeline,
    scaler: StandardScaler,
    classes: np.ndarray,
    coef: np.ndarray,
    intercept: np.ndarray,
    n_iter: int | None,
    temperature: float | None = None,
) -> Pipeline:
    """`model` (unfitted, from the registry) with the fitted attributes its fit would have set: the scaler's, and
    the linear estimator's coef_ [P, d] and intercept_ [P] in the shapes and types that estimator keeps."""
    model.steps[0] = (model.steps[0][0], copy.deepcopy(scaler))
    step = model.steps[-1][1]
    estimator = clone(step.estimator) if isinstance(step, TemperatureScaled) else step
    n_features = coef.shape[1]
    estimator.classes_, estimator.n_features_in_ = classes, n_features
    estimator.coef_, estimator.intercept_ = coef, np.asarray(intercept, dtype=np.float64)
    if isinstance(estimator, RidgeClassifier):
        estimator.coef_ = coef[0] if len(classes) == 2 else coef  # RidgeClassifier keeps two classes' row flat
        estimator.n_iter_, estimator.solver_ = None, "svd"  # an eigendecomposition of X'X: the SVD of X
    elif isinstance(estimator, LogisticRegression):
        estimator.n_iter_ = np.array([n_iter], dtype=np.int32)
    else:
        estimator.n_iter_ = int(n_iter)
    if isinstance(step, TemperatureScaled):
        step.estimator_, step.classes_, step.n_features_in_ = estimator, classes, n_features
        step.temperature = temperature
        step.temperature_ = 1.0 if temperature is None else float(temperature)
    return model


def proba_from_scores(model: Pipeline, logits: np.ndarray, y_out: np.ndarray, n_classes: int) -> np.ndarray:
    """pipeline.heads.selection.held_out_proba, from the held-out rows' scores [N, P] the solver computed (no
    standardised copy of the rows): a calibrated head fits its temperature on them first."""
    per_class = scores_per_class(logits, axis=1) if logits.shape[1] == 1 else logits
    step = model.steps[-1][1]
    if isinstance(step, TemperatureScaled):
        step.calibrate_logits(per_class, y_out)
        per_class = per_class / step.temperature_
    proba = softmax(per_class, axis=1)
    full = np.zeros((len(proba), n_classes))
    full[:, model.classes_] = proba  # as pipeline.heads.trained.full_proba: an unseen class keeps 0
    return full / full.sum(axis=1, keepdims=True)


# --- logistic regression and the squared-hinge SVM: warm-started L-BFGS paths ---------------------------------------


def _loss(estimator: BaseEstimator, y: np.ndarray, classes: np.ndarray, y_index: np.ndarray) -> Loss:
    if isinstance(estimator, LbfgsLinearSVC):
        return estimator.hinge_loss(y, classes, y_index)
    weights = np.ones(len(classes))
    if estimator.class_weight is not None:
        weights = compute_class_weight(estimator.class_weight, classes=classes, y=y)
    return Loss("logistic", y_index, len(classes), weights)


class LinearPath:
    """One (fit rows) set of a logistic or squared-hinge head: its scaler and solver, fits along C from a start.
    `take`: the rows of fit's features fitted (row numbers; fit's labels are theirs), None for all of them.
    `preconditioner`: a `shared_preconditioner` (default: the solver builds its own where it pays)."""

    def __init__(
        self,
        model: Pipeline,
        fit: Rows,
        device: str,
        take: np.ndarray | None = None,
        preconditioner: Preconditioner | None | bool = False,
    ):
        x, y = fit
        self.classes, y_index = np.unique(y, return_inverse=True)
        self.estimator = linear_estimator(model)
        self.scaler = fitted_scaler(x, take)
        loss = _loss(self.estimator, y, self.classes, y_index)
        self.solver = make_solver(device, x, loss, self.scaler.mean_, self.scaler.scale_, take, preconditioner)
        self.n_features, self.n_outputs = x.shape[1], loss.n_outputs
        self.bias_scale = loss.bias_scale
        self.unit_gradient_scale: float | None = None

    def stopping(self, estimator: BaseEstimator) -> Stopping:
        if isinstance(estimator, LbfgsLinearSVC):
            if self.unit_gradient_scale is None:
                self.unit_gradient_scale = self.solver.gradient_scale(1.0)
            return estimator.stopping(self.unit_gradient_scale)
        return Stopping.like_scikit_learn(estimator.tol, estimator.max_iter)

    def start_from(self, model: Pipeline | None) -> np.ndarray:
        """theta of a fitted head of the same kind and classes (its function of raw rows kept under this path's
        scaler), or zeros."""
        size = (self.n_features + 1) * self.n_outputs
        if model is None or not np.array_equal(model.classes_, self.classes):
            return np.zeros(size)
        scaler, estimator = model.steps[0][1], model.steps[-1][1]
        estimator = estimator.estimator_ if isinstance(estimator, TemperatureScaled) else estimator
        a, c = folded(np.atleast_2d(estimator.coef_), estimator.intercept_, scaler.mean_, scaler.scale_)
        coef, intercept = unfolded(a, c, self.scaler.mean_, self.scaler.scale_)
        bias = intercept / self.bias_scale if self.bias_scale else np.zeros(self.n_outputs)
        return np.concatenate([coef.ravel(), bias])

    def fit(self, model: Pipeline, start: np.ndarray, temperature: float | None = None) -> tuple[Pipeline, np.ndarray]:
        """`model` fitted from theta = `start`, and its theta (the next point's start)."""
        estimator = linear_estimator(model)
        theta, n_iter = self.solver.minimise(estimator.C, start, self.stopping(estimator))
        if n_iter == 0 and np.any(start):
            log.info(
                "%s C=%s: its warm start (the previous C's solution) already meets tol=%s, so both points are the same "
                "model; a lower tol separates them",
                type(estimator).__name__,
                estimator.C,
                estimator.tol,
            )
        if n_iter >= estimator.max_iter:
            warnings.warn(
                f"{type(estimator).__name__}: L-BFGS did not converge in {estimator.max_iter} iterations (C="
                f"{estimator.C}); raise max_iter",
                ConvergenceWarning,
                2,
            )
        coef = theta[: self.n_features * self.n_outputs].reshape(self.n_outputs, self.n_features).copy()
        intercept = self.bias_scale * theta[-self.n_outputs :]
        return fitted_pipeline(model, self.scaler, self.classes, coef, intercept, n_iter, temperature), theta

    def held_out(self, model: Pipeline, out: Rows, n_classes: int) -> np.ndarray:
        estimator = model.steps[-1][1]
        estimator = estimator.estimator_ if isinstance(estimator, TemperatureScaled) else estimator
        a, c = folded(np.atleast_2d(estimator.coef_), estimator.intercept_, self.scaler.mean_, self.scaler.scale_)
        return proba_from_scores(model, self.solver.scores(out[0], a, c), out[1], n_classes)


def _by_c(points: list[dict]) -> bool:
    """A path needs a grid of C alone (or no grid): points ascending in C, the strongest regularisation first."""
    return all(set(point) <= {"C"} for point in points)


def path_sweep(
    kind: Any,
    fixed: dict,
    points: list[dict],
    fit: Rows,
    out: Rows,
    n_classes: int,
    name: str,
    *,
    device: str = "cpu",
) -> Iterator[tuple[Pipeline, np.ndarray]] | None:
    """HeadKind.sweep of logreg and linear_svm: the grid of C as one warm-started path (ascending C, each fit
    starting from the previous solution). None where the arguments ask for another solver or the grid varies
    more than C: the points are then fitted one by one."""
    models = [kind.build({**fixed, **point}) for point in points]
    if not _by_c(points) or not all(supports(linear_estimator(m)) for m in models) or len(np.unique(fit[1])) < 2:
        return None
    return _walk(models, fit, out, n_classes, device)


def _walk(models: list[Pipeline], fit: Rows, out: Rows, n_classes: int, device: str) -> Iterator:
    path = LinearPath(models[0], fit, device)
    theta = path.start_from(None)
    for model in models:
        fitted, theta = path.fit(model, theta)
        yield fitted, path.held_out(fitted, out, n_classes)


def path_refit(
    kind: Any,
    args: dict,
    fit: Rows,
    name: str,
    *,
    start: Pipeline | None = None,
    temperature: float | None = None,
    device: str = "cpu",
) -> Pipeline | None:
    """HeadKind.refit of logreg and linear_svm: the chosen point on (x, y), warm-started from `start` (the grid's
    model of that point, same classes), with `temperature` kept. None where path_sweep would give None."""
    model = kind.build(args)
    if not supports(linear_estimator(model)) or len(np.unique(fit[1])) < 2:
        return None
    path = LinearPath(model, fit, device)
    return path.fit(model, path.start_from(start), temperature)[0]


def fit_logistic(
    x: np.ndarray,
    y: np.ndarray,
    C: float = 1.0,
    *,
    class_weight: dict | str | None = None,
    tol: float = 1e-4,
    max_iter: int = 1000,
    start: Pipeline | None = None,
    device: str = "cpu",
    take: np.ndarray | None = None,
    preconditioner: Preconditioner | None | bool = False,
) -> Pipeline:
    """One logistic regression on (x, y), as the logreg head fits it: a fitted Pipeline of StandardScaler and
    multinomial LogisticRegression (binomial for two classes), the very attributes their own fit gives, minimising
    scikit-learn's objective without copying x. `start`: such a pipeline to warm-start from (a neighbouring C, or
    the fit of an overlapping fold; used when its classes are the same). device: cpu (numpy) or cuda (torch).
    take: fit x's rows `take` alone (row numbers, y their labels), read a block at a time. preconditioner: one
    `shared_preconditioner` for several fits on subsets of the same rows (default: built for this fit if it pays)."""
    estimator = LogisticRegression(C=C, class_weight=class_weight, tol=tol, max_iter=max_iter)
    check_args(estimator)
    model = Pipeline([("scale", StandardScaler()), ("clf", estimator)])
    if len(np.unique(y)) < 2:
        return model.fit(x if take is None else x[take], y)  # scikit-learn's own error
    path = LinearPath(model, (x, y), device, take, preconditioner)
    return path.fit(model, path.start_from(start))[0]


def shared_preconditioner(x: np.ndarray, y: np.ndarray, take: np.ndarray | None = None) -> Preconditioner | None:
    """The preconditioner of logistic fits on x's rows `take` (labels y), built once for fits on large subsets of
    them (cross-validation folds): a fold's covariance is about the whole's, and a preconditioner only steers the
    path (the fit stops on the gradient, as without one). None where a fit would not use one (`preconditioned`)."""
    scaler = fitted_scaler(x, take)
    classes = np.unique(y)
    loss = Loss("logistic", np.searchsorted(classes, y), len(classes), np.ones(len(classes)))
    return preconditioned(Objective(x, loss, scaler.mean_, scaler.scale_, take))


def predict_proba_rows(model: Pipeline, x: np.ndarray, take: np.ndarray) -> np.ndarray:
    """model.predict_proba(x[take]), a block of rows at a time (no copy of x[take])."""
    out = np.empty((len(take), len(model.classes_)))
    for block, rows in blocks(x, take):
        out[block] = model.predict_proba(rows)
    return out
