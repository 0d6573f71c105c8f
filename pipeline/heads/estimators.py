"""Classifiers scikit-learn does not have (temperature scaling, an L-BFGS linear SVM, cosine centroids and k-NN)."""

from __future__ import annotations

import logging
import warnings
from numbers import Integral, Real

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import softmax
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.preprocessing import normalize
from sklearn.utils import Tags, check_scalar, get_tags
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from pipeline.core.accelerator import use_cuda
from pipeline.heads.neighbors import Centred, top_k
from pipeline.heads.objectives import Loss, Objective, Stopping, minimise, preconditioned

log = logging.getLogger(__name__)


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The T > 0 minimising the mean log loss of softmax(logits / T) against column indices `targets`.

    The loss is convex in 1/T, hence unimodal in log T: a bounded 1-D search finds it. The bounds (1/1000
    to 1000 times the logits' spread) only matter when the rows are perfectly separated, where the loss
    keeps falling as T goes to 0: T then stops at the lower bound and the probabilities saturate.
    """
    logits = np.asarray(logits, dtype=np.float64)
    spread = float(np.log(np.std(logits) or 1.0))
    # log softmax(l / T)[target] = (l[target] - max l) / T - log sum exp((l - max l) / T): the shifted logits are
    # computed once, each step of the search then costs one exp over them.
    shifted = logits - logits.max(axis=1, keepdims=True)
    true_shifted = shifted[np.arange(len(targets)), targets]
    scaled = np.empty_like(shifted)

    def mean_log_loss(log_t: float) -> float:
        inverse = np.exp(-log_t)
        np.multiply(shifted, inverse, out=scaled)
        np.exp(scaled, out=scaled)
        return float(np.mean(np.log(scaled.sum(axis=1)) - true_shifted * inverse))

    best = minimize_scalar(
        mean_log_loss, bounds=(spread - 7.0, spread + 7.0), method="bounded", options={"xatol": 1e-6}
    )
    return float(np.exp(best.x))


def scores_per_class(logit: np.ndarray, axis: int = 0) -> np.ndarray:
    """A two-class linear model's one logit z (of classes_[1] against classes_[0]) as one score per class, [0, z],
    along `axis`, where `logit` has length 1: softmax([0, z]) = [1 - sigmoid(z), sigmoid(z)]. The map being affine,
    this holds for its scores and, row for row, for its coefficients and intercept."""
    return np.concatenate([np.zeros_like(logit), logit], axis=axis)


def check_args(estimator: BaseEstimator) -> None:
    """The estimator's own checks of its arguments, which its fit runs first: a `check_params` method of ours, or
    the parameter constraints scikit-learn's estimators declare (what their fit validates first)."""
    if hasattr(estimator, "check_params"):
        estimator.check_params()
    elif hasattr(estimator, "_parameter_constraints"):
        estimator._validate_params()


class TemperatureScaled(ClassifierMixin, BaseEstimator):
    """Probabilities for a classifier that only has a decision function: softmax(decision_function / T).

    `fit` trains a clone of `estimator` and sets T to `temperature` (1 when None). `calibrate` then fits T
    on held-out rows by minimising their log loss (temperature scaling, Guo et al. 2017). Dividing every
    score by one positive number never changes the predicted class, only how confident it is.
    """

    def __init__(self, estimator: BaseEstimator, temperature: float | None = None):
        self.estimator = estimator
        self.temperature = temperature

    def __sklearn_tags__(self) -> Tags:
        # Input validation is the wrapped estimator's: whatever it accepts (sparse rows included), this does.
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = get_tags(self.estimator).input_tags.sparse
        return tags

    def fit(self, X: np.ndarray, y: np.ndarray) -> TemperatureScaled:
        if self.temperature is not None:
            check_scalar(self.temperature, "temperature", Real, min_val=0.0, include_boundaries="neither")
        self.estimator_ = clone(self.estimator).fit(X, y)
        self.classes_ = self.estimator_.classes_
        self.n_features_in_ = self.estimator_.n_features_in_
        self.temperature_ = 1.0 if self.temperature is None else float(self.temperature)
        return self

    def calibrate(self, X: np.ndarray, y: np.ndarray) -> TemperatureScaled:
        """Fit T on (X, y); rows of a class the estimator never saw cannot be scored and are left out."""
        return self.calibrate_logits(self._logits(X), y)

    def calibrate_logits(self, logits: np.ndarray, y: np.ndarray) -> TemperatureScaled:
        """`calibrate` from the rows' scores, one per class [N, n_classes] (a solver that computed them already)."""
        known = np.isin(y, self.classes_)
        if not known.any():
            log.warning("no calibration rows of a known class: temperature left at %s", self.temperature_)
            return self
        targets = np.searchsorted(self.classes_, y[known])
        self.temperature_ = fit_temperature(logits[known], targets)
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """The wrapped estimator's scores, unscaled: [N, n_classes], or [N] for two classes."""
        check_is_fitted(self)
        return self.estimator_.decision_function(X)

    def _logits(self, X: np.ndarray) -> np.ndarray:
        """One score per class, [N, n_classes]."""
        scores = np.asarray(self.decision_function(X), dtype=np.float64)
        return scores_per_class(scores[:, None], axis=1) if scores.ndim == 1 else scores  # [N]: one logit

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return softmax(self._logits(X) / self.temperature_, axis=1)

    def predict(self, X: np.ndarray) -> np.ndarray:
        best = self._logits(X).argmax(axis=1)  # first: unfitted, this raises NotFittedError
        return self.classes_[best]


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
    loops, on one core. Here each L-BFGS step costs two float32 matrix products for all classes together
    (BLAS, every core); `benchmarks/heads.py --synthetic` measures both. The minimiser is the same (tests
    compare the coefficients with LinearSVC's).
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
        self.check_params()
        X, y = validate_data(self, X, y, dtype=[np.float32, np.float64], order="C")
        check_classification_targets(y)
        self.classes_, y_index = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"LbfgsLinearSVC needs at least two classes; the data has one class: {self.classes_[0]!r}")
        objective = Objective(X, self.hinge_loss(y, self.classes_, y_index))
        stopping = self.stopping(objective.gradient_scale(1.0))
        result = minimise(objective, self.C, np.zeros(objective.size), stopping, preconditioned(objective))
        if result.nit >= self.max_iter:
            warnings.warn(f"LbfgsLinearSVC did not converge in {self.max_iter} iterations", ConvergenceWarning, 2)
        self.n_iter_ = int(result.nit)
        self.coef_, self.intercept_ = objective.coefficients(result.x)
        return self

    def check_params(self) -> None:
        """The arguments' checks, which fit runs first (and a path of fits, before its first)."""
        check_scalar(self.C, "C", Real, min_val=0.0, include_boundaries="neither")
        check_scalar(self.tol, "tol", Real, min_val=0.0, include_boundaries="neither")
        check_scalar(self.max_iter, "max_iter", Integral, min_val=1)

    def hinge_loss(self, y: np.ndarray, classes: np.ndarray, y_index: np.ndarray) -> Loss:
        """The objective's loss for labels y (y_index: their index in `classes`): one problem for two classes, one
        per class otherwise; a dict class_weight is keyed by the labels themselves, as in LinearSVC."""
        weights = np.ones(len(classes))
        if self.class_weight is not None:
            weights = compute_class_weight(self.class_weight, classes=classes, y=y)
        scaling = float(self.intercept_scaling) if self.fit_intercept else 0.0
        return Loss("squared_hinge", y_index, len(classes), weights, bias_scale=scaling)

    def stopping(self, unit_gradient_scale: float) -> Stopping:
        """Stop when the largest gradient entry is below tol times that at w = 0, for this C (the gradient at 0
        is C times `unit_gradient_scale`, that at C = 1)."""
        return Stopping(gtol=self.tol * self.C * unit_gradient_scale, max_iter=self.max_iter)

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self)
        scores = validate_data(self, X, reset=False) @ self.coef_.T + self.intercept_
        return scores.ravel() if scores.shape[1] == 1 else scores

    def predict(self, X: np.ndarray) -> np.ndarray:
        scores = self.decision_function(X)
        return self.classes_[(scores > 0).astype(int) if scores.ndim == 1 else scores.argmax(axis=1)]


NORMALIZE = ("l2", "cl2n")  # how the cosine heads normalise rows: L2 alone, or centred first (SimpleShot's CL2N)


def _check_normalize(normalize: str) -> None:
    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be 'l2' or 'cl2n', got {normalize!r}")


def column_mean(X: np.ndarray, rows_per_block: int = 8192) -> np.ndarray:
    """The mean row of X in float64, a block at a time (no float64 copy of X)."""
    total = np.zeros(X.shape[1])
    for start in range(0, len(X), rows_per_block):
        total += X[start : start + rows_per_block].sum(axis=0, dtype=np.float64)
    return total / max(len(X), 1)


class CosineCentroids(ClassifierMixin, BaseEstimator):
    """Nearest class mean by cosine similarity; decision_function = cosine to each class's mean direction.

    Hand-written because NearestCentroid ranks by euclidean distance to the raw means and has no cosine
    scores. The means are taken over L2-normalised rows, so every image weighs the same whatever its norm.
    normalize="cl2n" (SimpleShot's centred L2) subtracts the training rows' mean (`mean_`, a fitted attribute)
    from every row before normalising it, in fit and in scoring; "l2" normalises the rows as they are (mean_ None).
    Rows are normalised `ROWS_PER_BLOCK` at a time, in fit and in scoring: memory holds the rows given plus one
    block, never a normalised copy of them all.
    """

    ROWS_PER_BLOCK = 8192

    def __init__(self, normalize: str = "l2"):
        self.normalize = normalize

    def _unit(self, rows: np.ndarray) -> np.ndarray:
        mean = getattr(self, "mean_", None)  # None: l2, or a head saved before normalize existed
        return normalize(rows if mean is None else rows - mean.astype(rows.dtype))

    def fit(self, X: np.ndarray, y: np.ndarray) -> CosineCentroids:
        _check_normalize(self.normalize)
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
        check_classification_targets(y)
        self.classes_, y_index = np.unique(y, return_inverse=True)
        self.mean_ = column_mean(X, self.ROWS_PER_BLOCK) if self.normalize == "cl2n" else None
        sums = np.zeros((len(self.classes_), X.shape[1]))
        for start in range(0, len(X), self.ROWS_PER_BLOCK):
            block = slice(start, start + self.ROWS_PER_BLOCK)
            order = np.argsort(y_index[block], kind="stable")  # each class's rows together, for one sum per class
            present, first = np.unique(y_index[block][order], return_index=True)
            sums[present] += np.add.reduceat(self._unit(X[block])[order], first, axis=0, dtype=np.float64)
        self.centroids_ = normalize(sums / np.bincount(y_index)[:, None])
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        scores = np.empty((len(X), len(self.classes_)), dtype=np.result_type(X.dtype, self.centroids_.dtype))
        for start in range(0, len(X), self.ROWS_PER_BLOCK):
            block = slice(start, start + self.ROWS_PER_BLOCK)
            scores[block] = self._unit(X[block]) @ self.centroids_.T
        return scores

    def predict(self, X: np.ndarray) -> np.ndarray:
        best = self.decision_function(X).argmax(axis=1)  # first: unfitted, this raises NotFittedError
        return self.classes_[best]


class CosineNeighbors(ClassifierMixin, BaseEstimator):
    """k nearest neighbours by cosine similarity; probabilities are the neighbours' (weighted) vote fractions.

    The answers of KNeighborsClassifier(metric="cosine", algorithm="brute"): the same neighbours, the same votes,
    its distance weighting (1 / (1 - cosine); a row with neighbours at distance 0 gets its votes from those alone).
    The search is pipeline.heads.neighbors' exact blocked one (float32; ties go to the earlier fitted row), on a
    CUDA GPU when `device` says so (auto: when there is one). The metric is no argument: cosine is what this head is.
    normalize="cl2n" (SimpleShot's centred L2): every row, fitted or searched, minus the fitted rows' mean (`mean_`)
    before the cosine; "l2": the rows as they are (mean_ None).

    Fitting only validates and keeps the rows (no copy). `use_store_rows` then has the head search the same rows
    where they lie in the feature store, and a head file records their row numbers (`reference_rows_`, None until
    then) and labels, not the embeddings: a loaded head reads them from its store (pipeline.heads.persistence).
    """

    def __init__(self, n_neighbors: int = 5, *, weights: str = "uniform", device: str = "auto", normalize: str = "l2"):
        self.n_neighbors = n_neighbors
        self.weights = weights
        self.device = device
        self.normalize = normalize

    def fit(self, X: np.ndarray, y: np.ndarray) -> CosineNeighbors:
        check_scalar(self.n_neighbors, "n_neighbors", Integral, min_val=1)
        if self.weights not in ("uniform", "distance"):  # a callable could not be saved with the head
            raise ValueError(f"weights must be 'uniform' or 'distance', got {self.weights!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        _check_normalize(self.normalize)
        X, y = validate_data(self, X, y, order="C")
        check_classification_targets(y)
        self.classes_ = np.unique(y)
        self.mean_ = column_mean(X) if self.normalize == "cl2n" else None
        self.reference_labels_, self.reference_rows_ = y, None
        self._reference = X
        return self

    def use_store_rows(self, features: np.ndarray, rows: np.ndarray) -> CosineNeighbors:
        """Search rows `rows` of `features` (the feature store's), which are the rows it was fitted on, in order: the
        same answers, without keeping a copy of them."""
        check_is_fitted(self)
        rows = np.asarray(rows)
        if rows.dtype.kind not in "iu" or rows.shape != np.shape(self.reference_labels_):
            raise ValueError(f"{len(self.reference_labels_)} row numbers expected, got {rows.dtype} {rows.shape}")
        if np.ndim(features) != 2 or features.shape[1] != self.n_features_in_:
            raise ValueError(f"rows of {self.n_features_in_} features expected, got shape {np.shape(features)}")
        if rows.size and (rows.min() < 0 or rows.max() >= len(features)):
            raise ValueError(f"row numbers must be in [0, {len(features)}), got {rows.min()} to {rows.max()}")
        self._reference, self.reference_rows_ = features, rows.astype(np.int64)
        return self

    def neighbors(self, X: np.ndarray, n_neighbors: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Each row's `n_neighbors` (default: the head's) most cosine-similar fitted rows, most similar first:
        (cosines float32, positions among the fitted rows), both [n, n_neighbors]."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, order="C")
        k, fitted = n_neighbors or self.n_neighbors, len(self.reference_labels_)
        if k > fitted:  # KNeighborsClassifier's words
            raise ValueError(f"Expected n_neighbors <= n_samples_fit, but n_neighbors = {k}, n_samples_fit = {fitted}")
        device = "cuda" if use_cuda(self.device, "the knn head's device (heads.<name>.device)") else None
        queries, reference = X, self._reference
        mean = getattr(self, "mean_", None)  # None: l2, or a head saved before normalize existed
        if mean is not None:
            queries, reference = Centred(X, mean), Centred(reference, mean)
        return top_k(queries, reference, k, reference_rows=self.reference_rows_, device=device)

    def proba_from(self, cosines: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """predict_proba from neighbours already found (`neighbors`, for this k or more): the first `n_neighbors` of
        each row vote. KNeighborsClassifier's arithmetic: float32 weights summed in float64, nearest first."""
        cosines, positions = cosines[:, : self.n_neighbors], positions[:, : self.n_neighbors]
        labels = np.searchsorted(self.classes_, self.reference_labels_)[positions]
        n, n_classes = labels.shape[0], len(self.classes_)
        if self.weights == "uniform":
            weights = np.ones(labels.shape)
        else:
            distances = np.clip(1 - cosines, 0.0, 2.0)  # float32, as cosine_distances gives them
            with np.errstate(divide="ignore"):
                weights = 1.0 / distances
            exact = np.isinf(weights)
            at_zero = exact.any(axis=1)
            weights[at_zero] = exact[at_zero]
        cells = (np.arange(n)[:, None] * n_classes + labels).ravel()
        votes = np.bincount(cells, weights=weights.ravel(), minlength=n * n_classes).reshape(n, n_classes)
        return votes / votes.sum(axis=1, keepdims=True)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.proba_from(*self.neighbors(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        best = self.predict_proba(X).argmax(axis=1)  # first: unfitted, this raises NotFittedError
        return self.classes_[best]
