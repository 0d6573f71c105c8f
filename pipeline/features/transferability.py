"""LogME: how well a frozen backbone's features suit a labelled target task, without training anything.

Reference: Kaichao You, Yong Liu, Jianmin Wang, Mingsheng Long, "LogME: Practical Assessment of Pre-trained
Models for Transfer Learning", ICML 2021 (arXiv 2102.11005), Section 4 and Algorithm 1. Written here from the
paper's equations, numpy only, so that a stage can import it without torch, scipy or scikit-learn.

The model (Sec. 4). Features F (n x D); for each class k the target y_k in {0,1}^n is the k-th column of the
one-hot label matrix Y. Each y_k gets its own Bayesian linear model y = F w + e with prior w ~ N(0, alpha^-1 I_D)
and noise e ~ N(0, beta^-1 I_n). Integrating w out gives the evidence p(y | F, alpha, beta) =
N(y; 0, beta^-1 I_n + alpha^-1 F F^T), whose logarithm is the paper's closed form

    L(alpha, beta) = n/2 log beta + D/2 log alpha - n/2 log 2pi
                     - beta/2 ||F m - y||^2 - alpha/2 m^T m - 1/2 log det A,
    A = alpha I + beta F^T F,   m = beta A^-1 F^T y   (the posterior mean of w).

Maximisation (Sec. 4, Algorithm 1): MacKay's fixed point. With sigma_i the eigenvalues of F^T F,
gamma = sum_i beta sigma_i / (alpha + beta sigma_i), alpha <- gamma / m^T m, beta <- (n - gamma) / ||F m - y||^2,
starting from alpha = beta = 1. Algorithm 1 decomposes F^T F once, so that every step costs O(D) per class.

Normalisation (Algorithm 1's output): LogME = 1/K sum_k L_k(alpha_k*, beta_k*) / n, the maximum log evidence
per sample, averaged over the K classes. Dividing by n makes scores of data sets of different sizes comparable
(the evidence of n samples grows linearly with n); averaging over classes treats each one-hot column as one
regression target, as the paper does for multi-class labels. Larger is better. L is a log density, so its sign
means nothing on its own: compare backbones on the same labels.

Streaming (this module's addition, same mathematics): L depends on the data only through F^T F, F^T y, y^T y
and n, so `EvidenceStats` accumulates those chunk by chunk (memory O(D^2 + D K), independent of n) and the
solve works in the eigenbasis of F^T F, where A is diagonal. See `Spectrum` for how the residual
||F m - y||^2 is formed from the statistics without catastrophic cancellation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.core.errors import PipelineError

MAX_ITERATIONS = 1000
"""Cap on fixed-point steps per class. The authors' released code runs at most 11; with `TOLERANCE` here,
learnable features take a few steps and pure noise a few dozen (benchmarks/logme_speed.py counts them), but where
the evidence is nearly flat in alpha MacKay's update crawls (tests/test_transferability.py has a class still
moving after 1,000 steps, its L already right). One step costs O(r) per running class, so 1,000 is cheap; a class
that hits the cap reports converged=False."""

TOLERANCE = 1e-5
"""Stop when one step changes both alpha and beta by less than this fraction (or L by less than `STALL`)."""

STALL = 1e-12
"""Also stop when one step changes L by less than this fraction of |L|. Where the maximum lies at an edge,
alpha -> inf (features that do not help this class: w = 0) or beta -> inf (D >= n, the features fit y
exactly), that parameter grows geometrically for ever while L converges; this stop ends it."""


class TransferabilityError(PipelineError):
    """Features or labels that LogME cannot score; the message says what is wrong and what to pass instead."""


@dataclass(frozen=True)
class ClassEvidence:
    """The maximised evidence of one class's one-vs-rest target y_k (Algorithm 1, inner loop)."""

    label: int
    count: int  # y_k^T y_k: how many rows carry this label
    alpha: float  # prior precision at the maximum (inf where F^T y_k = 0: the best model is w = 0)
    beta: float  # noise precision at the maximum
    log_evidence: float  # L_k(alpha*, beta*), not divided by n
    iterations: int
    converged: bool  # False when MAX_ITERATIONS ran out first


@dataclass(frozen=True)
class Spectrum:
    """The statistics in the eigenbasis of F^T F = V diag(sigma) V^T, restricted to its numerical rank r.

    Directions with sigma_i = 0 contribute nothing but log alpha terms that cancel: D/2 log alpha - 1/2 log det A
    = r/2 log alpha - 1/2 sum_{i<=r} log(alpha + beta sigma_i). With z = V_r^T F^T y and m = V_r m~,
    m~_i = beta z_i / (alpha + beta sigma_i), so m^T m = sum m~_i^2, and the residual splits into two sums of
    non-negative terms (expanding y^T y - 2 m^T F^T y + m^T F^T F m directly would subtract nearly equal
    numbers whenever the fit is good):

        ||F m - y||^2 = rho + sum_i z_i^2 alpha^2 / (sigma_i (alpha + beta sigma_i)^2),
        rho = y^T y - sum_i z_i^2 / sigma_i   (the least-squares residual, formed once, clipped at 0).
    """

    n: int
    labels: np.ndarray  # (K,) the classes present, in increasing order
    counts: np.ndarray  # (K,) y_k^T y_k
    eigenvalues: np.ndarray  # (r,) sigma_i > 0
    projections: np.ndarray  # (r, K) z = V_r^T F^T Y
    ls_residual: np.ndarray  # (K,) rho

    def terms(self, alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, ...]:
        """gamma, m^T m, ||F m - y||^2 and L(alpha, beta) for every class at once (alpha, beta: shape (K,))."""
        return _terms(self.n, self.eigenvalues, self.projections**2, self.ls_residual, alpha, beta)

    def log_evidence(self, alpha: float, beta: float) -> np.ndarray:
        """L_k(alpha, beta) for each class k at fixed hyperparameters (the closed form above), shape (K,)."""
        shape = self.counts.shape
        return self.terms(np.full(shape, float(alpha)), np.full(shape, float(beta)))[3]

    def maximise(self, max_iterations: int = MAX_ITERATIONS, tolerance: float = TOLERANCE) -> list[ClassEvidence]:
        """Run Algorithm 1's fixed point for every class (vectorised over classes; each stops on its own)."""
        alpha, beta, iterations, converged, log_evidence = _fixed_point(self, max_iterations, tolerance)
        results = []
        for k, label in enumerate(self.labels):
            if not np.any(self.projections[:, k]):
                results.append(self._without_weights(k))
                continue
            results.append(
                ClassEvidence(
                    int(label),
                    int(self.counts[k]),
                    float(alpha[k]),
                    float(beta[k]),
                    float(log_evidence[k]),
                    int(iterations[k]),
                    bool(converged[k]),
                )
            )
        return results

    def _without_weights(self, k: int) -> ClassEvidence:
        """The limit alpha -> inf where F^T y_k = 0: m = 0, L = n/2 log beta - n/2 log 2pi - beta/2 y^T y, max
        at beta = n / y^T y."""
        n, yy = self.n, float(self.counts[k])
        beta = n / yy
        value = n / 2 * math.log(beta) - n / 2 * math.log(2 * math.pi) - n / 2
        return ClassEvidence(int(self.labels[k]), int(self.counts[k]), math.inf, beta, value, 0, True)


def _terms(
    n: int, sigma: np.ndarray, z2: np.ndarray, rho: np.ndarray, alpha: np.ndarray, beta: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """gamma, m^T m, ||F m - y||^2 and L(alpha, beta) per column of z2 (r x K'), from `Spectrum`'s formulas."""
    s = sigma[:, None]
    denom = alpha + beta * s  # (r, K'): the diagonal of A = alpha I + beta F^T F in the eigenbasis
    gamma = (beta * s / denom).sum(axis=0)  # effective number of well-determined parameters
    mm = beta**2 * (z2 / denom**2).sum(axis=0)
    residual = rho + alpha**2 * (z2 / (s * denom**2)).sum(axis=0)
    log_evidence = (
        n / 2 * np.log(beta)
        + len(sigma) / 2 * np.log(alpha)
        - n / 2 * math.log(2 * math.pi)
        - beta / 2 * residual
        - alpha / 2 * mm
        - np.log(denom).sum(axis=0) / 2
    )
    return gamma, mm, residual, log_evidence


def _fixed_point(
    spectrum: Spectrum, max_iterations: int, tolerance: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MacKay's updates (Algorithm 1) for all classes; each class stops as soon as it has converged.

    Returns alpha*, beta*, steps taken, whether each converged, and L at (alpha*, beta*). Only the classes still
    running are computed, so one slow class costs O(r) a step. Deterministic: the same statistics give the
    same floats. Classes with F^T y = 0 do not iterate (`Spectrum.maximise` treats them apart).
    """
    n, sigma, rho, z2 = spectrum.n, spectrum.eigenvalues, spectrum.ls_residual, spectrum.projections**2
    k = len(spectrum.labels)
    alpha, beta = np.ones(k), np.ones(k)  # Algorithm 1 starts from alpha = beta = 1
    gamma, mm, residual, log_evidence = _terms(n, sigma, z2, rho, alpha, beta)
    active = np.any(spectrum.projections, axis=0)
    iterations = np.zeros(k, dtype=np.int64)
    tiny = np.finfo(np.float64).tiny  # guards 0 / 0 when a class is fitted exactly
    for _ in range(max_iterations):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        new_alpha = gamma[idx] / np.maximum(mm[idx], tiny)
        new_beta = (n - gamma[idx]) / np.maximum(residual[idx], tiny)
        small_step = (np.abs(new_alpha - alpha[idx]) <= tolerance * alpha[idx]) & (
            np.abs(new_beta - beta[idx]) <= tolerance * beta[idx]
        )
        gamma[idx], mm[idx], residual[idx], new_log_evidence = _terms(
            n, sigma, z2[:, idx], rho[idx], new_alpha, new_beta
        )
        old = log_evidence[idx]
        stalled = np.abs(new_log_evidence - old) <= STALL * np.maximum(np.abs(old), 1.0)
        alpha[idx], beta[idx], log_evidence[idx] = new_alpha, new_beta, new_log_evidence
        iterations[idx] += 1
        active[idx[small_step | stalled]] = False
    return alpha, beta, iterations, ~active, log_evidence


class EvidenceStats:
    """Sufficient statistics of (features, labels) for LogME, accumulated chunk by chunk.

    Holds n, F^T F (D x D), F^T Y (D x K) and the class counts y_k^T y_k, all float64 / int64: memory
    O(D^2 + D K) whatever n is, so a caller can stream a store of a million rows. `logme()` decomposes F^T F
    once (numpy.linalg.eigh) and maximises each class's evidence in that eigenbasis.

    `num_classes`: the label range 0..num_classes-1, if known (labels outside it are an error); without it the
    range grows with the largest label seen. Classes that never occur are skipped: their target y_k = 0 has no
    evidence maximum (beta -> inf), and LogME averages over the classes present.
    """

    def __init__(self, num_classes: int | None = None) -> None:
        if num_classes is not None and num_classes < 1:
            raise TransferabilityError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        self.n = 0
        self.gram: np.ndarray | None = None  # F^T F
        self.targets: np.ndarray | None = None  # F^T Y, one column per label value
        self.counts = np.zeros(num_classes or 0, dtype=np.int64)

    @property
    def dim(self) -> int | None:
        """D, the feature width, once a chunk has been added."""
        return None if self.gram is None else self.gram.shape[0]

    def add(self, features: np.ndarray, labels: np.ndarray) -> None:
        """Add a chunk of rows: features (c x D, any real dtype) and their integer labels (c,)."""
        f, y = _checked_chunk(features, labels, self.dim, self.num_classes)
        if self.gram is None:
            self.gram = np.zeros((f.shape[1], f.shape[1]))
            self.targets = np.zeros((f.shape[1], len(self.counts)))
        if len(y) == 0:
            return
        width = max(len(self.counts), int(y.max()) + 1)
        if width > len(self.counts):  # a label larger than any seen so far (num_classes not given)
            self.counts = np.pad(self.counts, (0, width - len(self.counts)))
            self.targets = np.pad(self.targets, ((0, 0), (0, width - self.targets.shape[1])))
        self.gram += f.T @ f  # numpy computes A^T A with one symmetric rank-k update (BLAS syrk)
        order = np.argsort(y, kind="stable")
        present, starts = np.unique(y[order], return_index=True)
        self.targets[:, present] += np.add.reduceat(f[order], starts, axis=0).T  # per-class feature sums
        self.counts += np.bincount(y, minlength=width)
        self.n += len(y)

    def spectrum(self) -> Spectrum:
        """Eigendecompose F^T F once and project F^T Y onto its eigenvectors (Algorithm 1, the SVD step)."""
        present = np.flatnonzero(self.counts)
        if self.n < 2:
            raise TransferabilityError(f"LogME needs at least 2 rows, got {self.n}")
        if len(present) < 2:
            raise TransferabilityError(
                f"LogME needs at least 2 classes among the labels, got {len(present)} "
                f"(labels seen: {present.tolist()}); a single class has nothing to tell apart"
            )
        sigma, vectors = np.linalg.eigh(self.gram)
        sigma = np.clip(sigma, 0.0, None)  # rounding can leave tiny negative eigenvalues
        # Numerical rank r: below this an eigenvalue is rounding noise of a zero, from eigh (~ D eps sigma_max)
        # or from summing n rows into F^T F (up to ~ n eps sigma_max); numpy's matrix_rank uses the same form.
        keep = sigma > sigma.max(initial=0.0) * max(self.gram.shape[0], self.n) * np.finfo(np.float64).eps
        z = vectors[:, keep].T @ self.targets[:, present]
        counts = self.counts[present]
        rho = np.clip(counts - (z**2 / sigma[keep, None]).sum(axis=0), 0.0, None)
        return Spectrum(self.n, present, counts, sigma[keep], z, rho)

    def class_evidence(self, max_iterations: int = MAX_ITERATIONS, tolerance: float = TOLERANCE) -> list[ClassEvidence]:
        """Each present class's maximised evidence L_k(alpha_k*, beta_k*), not yet divided by n."""
        return self.spectrum().maximise(max_iterations, tolerance)

    def logme(self, max_iterations: int = MAX_ITERATIONS, tolerance: float = TOLERANCE) -> float:
        """LogME = 1/K sum_k L_k(alpha_k*, beta_k*) / n over the K classes present (Algorithm 1's output)."""
        evidences = self.class_evidence(max_iterations, tolerance)
        return float(np.mean([e.log_evidence for e in evidences]) / self.n)


def _checked_chunk(
    features: np.ndarray, labels: np.ndarray, dim: int | None, num_classes: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """The chunk as float64 features and int64 labels, or a one-line TransferabilityError saying what is wrong."""
    f = np.asarray(features)
    y = np.asarray(labels)
    if f.ndim != 2:
        raise TransferabilityError(f"features must be a 2-D array (rows x dims), got shape {f.shape}")
    if y.ndim != 1 or len(y) != len(f):
        raise TransferabilityError(
            f"features and labels must have the same number of rows: features {f.shape}, labels {y.shape}"
        )
    if dim is not None and f.shape[1] != dim:
        raise TransferabilityError(f"every chunk must have {dim} feature columns like the first, got {f.shape[1]}")
    if not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise TransferabilityError(f"labels must be integer class indices 0..K-1, got dtype {y.dtype}")
    y = y.astype(np.int64, copy=False)
    if len(y) and (y.min() < 0 or (num_classes is not None and y.max() >= num_classes)):
        top = "K-1" if num_classes is None else num_classes - 1
        raise TransferabilityError(f"labels must lie in 0..{top}, got values from {y.min()} to {y.max()}")
    if not (np.issubdtype(f.dtype, np.floating) or np.issubdtype(f.dtype, np.integer) or f.dtype == np.bool_):
        raise TransferabilityError(f"features must be real numbers, got dtype {f.dtype}")
    f = f.astype(np.float64, copy=False)
    if not np.isfinite(f).all():
        bad = int((~np.isfinite(f)).any(axis=1).sum())
        raise TransferabilityError(f"features contain NaN or infinite values in {bad} of {len(f)} rows")
    return f, y


def logme(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    max_iterations: int = MAX_ITERATIONS,
    tolerance: float = TOLERANCE,
) -> float:
    """LogME of features (n x D) for integer class labels (n,) in 0..K-1: 1/K sum_k max L_k / n (Algorithm 1).

    Higher means the features explain the labels better under the paper's linear-Gaussian model. Classes absent
    from `labels` are skipped. Raises TransferabilityError for fewer than 2 rows or 2 classes, non-finite
    features, or features and labels of different lengths.
    """
    stats = EvidenceStats()
    stats.add(features, labels)
    return stats.logme(max_iterations, tolerance)
