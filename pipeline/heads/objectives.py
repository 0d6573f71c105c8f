"""The linear heads' objectives (logistic, squared hinge) on raw feature rows with the standardisation folded in,
evaluated in row blocks, and the L-BFGS-B minimisation scikit-learn and LbfgsLinearSVC do on them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy.linalg import eigh
from scipy.optimize import OptimizeResult, minimize
from scipy.special import expit
from sklearn.preprocessing import StandardScaler

# Rows per block: every temporary (a block of scores, a float64 copy of a block of rows) is this many rows long,
# never the whole matrix, whatever the number of rows; large enough that each block is one efficient BLAS call.
ROWS = 16384


def row_blocks(n_rows: int, rows: int = ROWS) -> list[slice]:
    return [slice(start, min(start + rows, n_rows)) for start in range(0, n_rows, rows)]


def blocks(x: np.ndarray, take: np.ndarray | None = None, rows: int = ROWS) -> Iterator[tuple[slice, np.ndarray]]:
    """(positions, rows) a block at a time: x's rows `take` (row numbers, in that order; None: every row), so that
    a solver fits on a subset of the store (a fold) holding one block of it at a time, never a copy of the subset."""
    for block in row_blocks(len(x) if take is None else len(take), rows):
        yield block, (x[block] if take is None else x[take[block]])


def fitted_scaler(x: np.ndarray, take: np.ndarray | None = None, rows: int = 4096) -> StandardScaler:
    """StandardScaler().fit(x[take]), `rows` at a time: its fit subtracts the mean from a float64 copy of the whole
    matrix (twice the features, in float64), its partial_fit does the same to one block."""
    scaler = StandardScaler()
    for _, block in blocks(x, take, rows):
        scaler.partial_fit(block)
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


def scores(x: np.ndarray, a: np.ndarray, c: np.ndarray, take: np.ndarray | None = None) -> np.ndarray:
    """x[take] @ a.T + c in float64, [N, P], block by block (each block's product in the features' dtype)."""
    out = np.empty((len(x) if take is None else len(take), len(c)))
    a_x = a.astype(x.dtype)
    for block, rows in blocks(x, take):
        out[block] = rows @ a_x.T
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
    stays float32); scores, losses and the gradient's sums over blocks are float64. `take`: the rows of x it is
    a loss of (row numbers; loss.y holds their labels in that order), None for all of them."""

    def __init__(
        self,
        x: np.ndarray,
        loss: Loss,
        mean: np.ndarray | None = None,
        scale: np.ndarray | None = None,
        take: np.ndarray | None = None,
    ):
        self.x, self.loss, self.take = x, loss, take
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
        for block, rows in blocks(x, self.take):
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


class Preconditioner:
    """A change of variables W = V @ T that makes the objective's curvature in V about the same in every direction, so
    that L-BFGS needs a fraction of the iterations on correlated features (CNN embeddings are: a few directions carry
    most of their variance). The curvature of either loss along the features is about a multiple of the standardised
    rows' covariance R = U diag(lambda) U' plus the penalty's: T = U diag(h^-1/2) U', h = kappa lambda + rho
    (`curvature`). It changes the path, not the minimum: `minimise` stops on the gradient in W, as without it.

    R comes from one pass over the rows in their own dtype (float32 products, float64 sums: an approximation is all
    a preconditioner needs), then one eigendecomposition of a features x features matrix."""

    def __init__(self, x: np.ndarray, scale: np.ndarray, take: np.ndarray | None = None):
        n_rows, n_features = (len(x) if take is None else len(take)), x.shape[1]
        mean = np.zeros(n_features)
        for _, rows in blocks(x, take):
            mean += rows.sum(axis=0, dtype=np.float64)
        mean /= max(n_rows, 1)
        centre = mean.astype(x.dtype)
        covariance = np.zeros((n_features, n_features))
        for _, rows in blocks(x, take):
            rows = rows - centre
            covariance += rows.T @ rows  # numpy calls BLAS's syrk for a.T @ a
        covariance /= max(n_rows, 1) * np.outer(scale, scale)
        eigenvalues, self.eigenvectors = eigh(covariance)
        self.eigenvalues = np.maximum(eigenvalues, 0.0)
        self.n_rows = n_rows

    def curvature(self, loss: Loss, C: float) -> np.ndarray:
        """h: the objective's curvature along each eigenvector, roughly. Logistic (scikit-learn's scaling, the data
        term a mean): a softmax's curvature is about 1/K per class (1/4 for one logit), the penalty 1 / (C sum w).
        Squared hinge (LbfgsLinearSVC's, the data term a sum): 2 C per active row (about a tenth of them), the
        penalty 1. Normalised by its median, so that V keeps W's scale."""
        if loss.kind == "logistic":
            kappa = 0.25 if loss.n_outputs == 1 else 1.0 / loss.n_outputs
            h = kappa * self.eigenvalues + 1.0 / (C * loss.total_weight())
        else:
            h = 2.0 * C * 0.1 * self.n_rows * self.eigenvalues + 1.0
        return h / np.median(h)

    def transform(self, loss: Loss, C: float) -> tuple[np.ndarray, np.ndarray]:
        """(T, its inverse) [d, d], symmetric: W = V @ T, V = W @ T^-1."""
        root = np.sqrt(self.curvature(loss, C))
        return (self.eigenvectors / root) @ self.eigenvectors.T, (self.eigenvectors * root) @ self.eigenvectors.T


def preconditioned(objective: Objective) -> Preconditioner | None:
    """The objective's Preconditioner where it pays: building it (one pass over the rows, an eigendecomposition of
    d x d, about 10 d^3 operations) costs less than the evaluations it saves (half of several dozen, 4 n P d each),
    i.e. where rows x outputs >= d^2 / 20 (at 1,280 features: 82,000, e.g. 10,000 images of 10 classes); and each
    evaluation in its variables adds 4 d^2 P to those 4 n P d, which the saved evaluations repay only from about
    n >= 8 d rows (measured at 1,280 features and 100 classes, five C from 0.001 to 10 on the synthetic 10^5 store's
    rows, machine shared: 1,600 rows 14.1 s with it against 4.3 s without, 7,000 rows 15.6 against 12.7, 20,000 rows
    29.5 against 46.1). Below either, the plain L-BFGS path is kept, unchanged."""
    n_rows = len(objective.x) if objective.take is None else len(objective.take)
    n_features = objective.x.shape[1]
    if n_rows < 8 * n_features or 20 * n_rows * objective.loss.n_outputs < n_features**2:
        return None
    return Preconditioner(objective.x, objective.scale, objective.take)


def minimise(
    objective: Objective,
    C: float,
    start: np.ndarray,
    stopping: Stopping,
    preconditioner: Preconditioner | None = None,
) -> OptimizeResult:
    """scipy's L-BFGS-B from `start` (a warm start: the solution at a neighbouring C), in the preconditioner's
    variables if there is one. Either way it stops when the largest entry of the gradient in W is below
    stopping.gtol (or on stopping.ftol, or after stopping.max_iter iterations): the same minimum, reached in fewer
    evaluations. A start that meets gtol already is returned as it is (nit 0)."""
    options = {"maxiter": stopping.max_iter, "ftol": stopping.ftol, "maxls": stopping.max_line_search}
    if preconditioner is None:
        return minimize(objective, start, args=(C,), jac=True, method="L-BFGS-B",
                        options={**options, "gtol": stopping.gtol})  # fmt: skip
    value, gradient = objective(start, C)
    if np.abs(gradient).max() <= stopping.gtol:
        return OptimizeResult(x=start, fun=value, jac=gradient, nit=0, nfev=1, success=True, message="start meets gtol")
    n_weights = objective.loss.n_outputs * objective.x.shape[1]
    transform, inverse = preconditioner.transform(objective.loss, C)
    n_features = transform.shape[0]

    def to_w(v: np.ndarray) -> np.ndarray:
        w = v[:n_weights].reshape(-1, n_features) @ transform
        return np.concatenate([w.ravel(), v[n_weights:]])

    last: dict = {}

    def in_v(v: np.ndarray) -> tuple[float, np.ndarray]:
        value, gradient = objective(to_w(v), C)
        last.update(v=v.copy(), largest=np.abs(gradient).max())
        g_v = gradient[:n_weights].reshape(-1, n_features) @ transform  # T symmetric: dV = dW @ T'
        return value, np.concatenate([g_v.ravel(), gradient[n_weights:]])

    def converged(intermediate_result: OptimizeResult) -> None:
        v = intermediate_result.x
        largest = last["largest"] if np.array_equal(last.get("v"), v) else np.abs(objective(to_w(v), C)[1]).max()
        if largest <= stopping.gtol:
            raise StopIteration

    v_start = np.concatenate([(start[:n_weights].reshape(-1, n_features) @ inverse).ravel(), start[n_weights:]])
    result = minimize(in_v, v_start, jac=True, method="L-BFGS-B", callback=converged,
                      options={**options, "gtol": 0.0})  # fmt: skip
    result.x = to_w(result.x)
    return result
