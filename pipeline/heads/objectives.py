"""The linear heads' objectives (logistic, squared hinge) on raw feature rows with the standardisation folded in,
evaluated in row blocks, and the L-BFGS-B minimisation scikit-learn and LbfgsLinearSVC do on them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import OptimizeResult, minimize
from scipy.special import expit
from sklearn.preprocessing import StandardScaler

# Rows per block: every temporary (a block of scores, a float64 copy of a block of rows) is this many rows long,
# never the whole matrix, whatever the number of rows; large enough that each block is one efficient BLAS call.
ROWS = 16384


def row_blocks(n_rows: int, rows: int = ROWS) -> list[slice]:
    return [slice(start, min(start + rows, n_rows)) for start in range(0, n_rows, rows)]


def fitted_scaler(x: np.ndarray, rows: int = 4096) -> StandardScaler:
    """StandardScaler().fit(x), `rows` at a time: its fit subtracts the mean from a float64 copy of the whole
    matrix (twice the features, in float64), its partial_fit does the same to one block."""
    scaler = StandardScaler()
    for block in row_blocks(len(x), rows):
        scaler.partial_fit(x[block])
    return scaler


def folded(coef: np.ndarray, intercept: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> tuple:
    """A linear map of standardised rows, ((x - mean) / scale) @ coef.T + intercept, as one of raw rows:
    x @ a.T + c. What lets every solver here read the features as they are, never a standardised copy."""
    a = np.asarray(coef, dtype=np.float64) / scale
    return a, np.asarray(intercept, dtype=np.float64) - a @ mean


def unfolded(a: np.ndarray, c: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> tuple:
    """The inverse of `folded`: the same map of raw rows, as coefficients and intercept of rows standardised
    with (mean, scale). A warm start carried from one scaler to another keeps the function it computes."""
    return a * scale, c + a @ mean


def scores(x: np.ndarray, a: np.ndarray, c: np.ndarray) -> np.ndarray:
    """x @ a.T + c in float64, [N, P], block by block (each block's product in the features' dtype)."""
    out = np.empty((len(x), len(c)))
    a_x = a.astype(x.dtype)
    for block in row_blocks(len(x)):
        out[block] = x[block] @ a_x.T
    return out + c


@dataclass(frozen=True)
class Loss:
    """Which loss a linear head minimises, and the weights of its rows; the targets are class indices.

    logistic: scikit-learn's LogisticRegression (lbfgs): the multinomial loss over n_outputs = K classes, or for
    two classes the binomial loss of one logit (of class 1), weighted by `row_weight`; the objective is scaled
    as scikit-learn scales it, (sum_i w_i loss_i + |W|^2 / 2C) / sum_i w_i, the intercept unpenalised.
    squared_hinge: LbfgsLinearSVC's: one-vs-rest problems (one for two classes), 0.5 (|W|^2 + |b|^2) +
    C sum_ik cost_ik max(0, 1 - sign_ik z_ik)^2, cost_ik = class_weight[k] on the rows of class k and 1 on the
    others (for two classes, each class's weight on its rows); the bias is a feature of value `bias_scale`.
    """

    kind: str  # "logistic" or "squared_hinge"
    y: np.ndarray  # [N] class index, 0 .. K-1
    n_classes: int
    class_weight: np.ndarray  # [K]
    bias_scale: float = 1.0

    @property
    def n_outputs(self) -> int:
        return 1 if self.n_classes == 2 else self.n_classes

    @property
    def penalise_bias(self) -> bool:
        return self.kind == "squared_hinge"

    def total_weight(self) -> float:
        """logistic: the sum of row weights, which scales its objective."""
        return float(np.sum(self.class_weight[self.y]))

    def factors(self, C: float) -> tuple[float, float]:
        """(weight of the data term, weight of 0.5 |W|^2) in the objective at C."""
        if self.kind == "logistic":
            total = self.total_weight()
            return 1.0 / total, 1.0 / (C * total)
        return float(C), 1.0

    def block(self, rows: slice, z: np.ndarray) -> tuple[float, np.ndarray]:
        """Summed loss of the rows `rows`, whose scores are z [B, P] (float64, overwritten), and its derivative by
        z. In place where it can be: these passes over a block of scores cost a quarter of an evaluation."""
        y = self.y[rows]
        picked = (np.arange(len(y)), y if self.n_outputs > 1 else np.zeros(len(y), dtype=int))
        if self.kind == "logistic" and self.n_outputs == 1:
            w, target, logit = self.class_weight[y], (y == 1).astype(np.float64), z[:, 0]
            loss = np.logaddexp(0.0, logit) - target * logit
            return float(w @ loss), (w * (expit(logit) - target))[:, None]
        if self.kind == "logistic":
            w = self.class_weight[y]
            z -= z.max(axis=1, keepdims=True)
            true_score = z[picked]
            np.exp(z, out=z)
            total = z.sum(axis=1)
            loss = float(w @ (np.log(total) - true_score))
            z *= (w / total)[:, None]  # the probabilities, weighted
            z[picked] -= w
            return loss, z
        # Squared hinge: sign = -1 but for the positive entry (class 1 of one problem, or the row's class).
        positive = picked if self.n_outputs > 1 else (np.flatnonzero(y == 1), np.zeros(int(np.sum(y == 1)), int))
        z[positive] *= -1.0  # sign * z, negated
        np.add(z, 1.0, out=z)  # slack = 1 - sign * z ...
        np.maximum(z, 0.0, out=z)  # ... where positive
        weighted = z * (self.class_weight[y][:, None] if self.n_outputs == 1 else 1.0)
        if self.n_outputs > 1:
            weighted[picked] *= self.class_weight[y]
        loss = float(np.vdot(weighted, z))
        weighted *= 2.0  # d loss / d z = -2 sign cost slack
        weighted[positive] *= -1.0
        return loss, weighted


def split(theta: np.ndarray, n_outputs: int, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """theta = (W [P, d] row by row, b [P]) -> (W, b), views."""
    return theta[: n_outputs * n_features].reshape(n_outputs, n_features), theta[n_outputs * n_features :]


class Objective:
    """A loss of the linear model z = ((x - mean) / scale) @ W.T + bias_scale * b, and its gradient in
    theta = (W, b), computed on the raw rows x: z = x @ (W / scale).T + (bias_scale * b - (W / scale) @ mean),
    so the rows are read as they are, one block at a time. The products run in the features' dtype (float32
    stays float32); scores, losses and the gradient's sums over blocks are float64."""

    def __init__(self, x: np.ndarray, loss: Loss, mean: np.ndarray | None = None, scale: np.ndarray | None = None):
        self.x, self.loss = x, loss
        n_features = x.shape[1]
        self.mean = np.zeros(n_features) if mean is None else np.asarray(mean, dtype=np.float64)
        self.scale = np.ones(n_features) if scale is None else np.asarray(scale, dtype=np.float64)
        self.size = (n_features + 1) * loss.n_outputs

    def coefficients(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(coef_ [P, d], intercept_ [P]) of the model theta, for standardised rows."""
        w, b = split(theta, self.loss.n_outputs, self.x.shape[1])
        return w.copy(), self.loss.bias_scale * b

    def theta(self, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
        """The inverse of `coefficients`."""
        scale = self.loss.bias_scale
        bias = np.ravel(intercept) / scale if scale else np.zeros(self.loss.n_outputs)  # no intercept: b stays 0
        return np.concatenate([np.ravel(coef), bias])

    def __call__(self, theta: np.ndarray, C: float) -> tuple[float, np.ndarray]:
        loss, x = self.loss, self.x
        w, b = split(theta, loss.n_outputs, x.shape[1])
        a, c = folded(w, loss.bias_scale * b, self.mean, self.scale)
        a_x = a.astype(x.dtype)
        total, grad_a, grad_c = 0.0, np.zeros_like(a), np.zeros_like(c)
        for block in row_blocks(len(x)):
            rows = x[block]
            block_loss, d_z = loss.block(block, (rows @ a_x.T) + c)
            total += block_loss
            grad_a += (rows.T @ d_z.astype(x.dtype)).T  # OpenBLAS: several times faster than d_z.T @ rows
            grad_c += d_z.sum(axis=0)
        data, reg = loss.factors(C)
        grad_w = data * (grad_a - grad_c[:, None] * self.mean) / self.scale + reg * w
        grad_b = data * loss.bias_scale * grad_c + (reg * b if loss.penalise_bias else 0.0)
        penalty = float(np.sum(w * w)) + (float(b @ b) if loss.penalise_bias else 0.0)
        return data * total + 0.5 * reg * penalty, np.concatenate([grad_w.ravel(), grad_b])

    def gradient_scale(self, C: float) -> float:
        """The largest gradient entry at theta = 0: LbfgsLinearSVC stops at `tol` times it."""
        return float(np.abs(self(np.zeros(self.size), C)[1]).max())


@dataclass(frozen=True)
class Stopping:
    """When L-BFGS-B stops: the largest gradient entry below `gtol`, a relative decrease of the objective below
    `ftol`, or `max_iter` iterations; `max_line_search` steps per line search."""

    gtol: float
    max_iter: int
    ftol: float = 2.220446049250313e-09  # scipy's default (LbfgsLinearSVC's)
    max_line_search: int = 20  # scipy's default (LbfgsLinearSVC's)

    @classmethod
    def like_scikit_learn(cls, tol: float, max_iter: int) -> Stopping:
        """LogisticRegression's lbfgs options (scikit-learn's _logistic_regression_path)."""
        return cls(gtol=tol, max_iter=max_iter, ftol=64 * np.finfo(float).eps, max_line_search=50)


def minimise(objective: Objective, C: float, start: np.ndarray, stopping: Stopping) -> OptimizeResult:
    """scipy's L-BFGS-B from `start` (a warm start: the solution at a neighbouring C)."""
    return minimize(
        objective,
        start,
        args=(C,),
        jac=True,
        method="L-BFGS-B",
        options={
            "maxiter": stopping.max_iter,
            "gtol": stopping.gtol,
            "ftol": stopping.ftol,
            "maxls": stopping.max_line_search,
        },
    )
