"""LogME (pipeline/features/transferability.py) against the evidence computed the slow, direct way, and its invariants.

The reference here is the definition, not another implementation: for each class the evidence is the Gaussian
density N(y; 0, beta^-1 I + alpha^-1 F F^T), evaluated with a dense n x n covariance, and its maximum over
(alpha, beta) is found by scipy.optimize (tests may import scipy; the module may not).
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from scipy.optimize import minimize

from pipeline.core.errors import PipelineError
from pipeline.features.transferability import MAX_ITERATIONS, EvidenceStats, TransferabilityError, logme


def dense_log_evidence(features: np.ndarray, y: np.ndarray, log_alpha: float, log_beta: float) -> float:
    """log N(y; 0, beta^-1 I + alpha^-1 F F^T) from the n x n covariance (slogdet and solve)."""
    n = len(y)
    # Clipped so that the optimiser can walk towards alpha -> inf (w = 0) without overflowing exp.
    alpha, beta = np.exp(min(log_alpha, 60.0)), np.exp(min(log_beta, 60.0))
    covariance = np.eye(n) / beta + features @ features.T / alpha
    sign, logdet = np.linalg.slogdet(covariance)
    assert sign > 0
    return -0.5 * (n * math.log(2 * math.pi) + logdet + y @ np.linalg.solve(covariance, y))


def direct_maximum(features: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """max over (log alpha, log beta) of the dense log evidence, best of several Nelder-Mead starts."""
    best = None
    for start in [(0.0, 0.0), (3.0, 1.0), (-2.0, 2.0), (6.0, 0.5)]:
        result = minimize(
            lambda p: -dense_log_evidence(features, y, p[0], p[1]),
            start,
            method="Nelder-Mead",
            options={"xatol": 1e-10, "fatol": 1e-14, "maxiter": 20_000, "maxfev": 40_000},
        )
        if best is None or result.fun < best.fun:
            best = result
    return -best.fun, math.exp(best.x[0]), math.exp(best.x[1])


def small_problem(n: int, dim: int, seed: int, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian features, one of them shifted by the label (so the evidence has an interior maximum)."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, dim))
    labels = rng.integers(0, classes, n)
    features[:, 0] += 0.7 * labels
    return features, labels


def blobs(separation: float, n: int = 300, dim: int = 16, classes: int = 4, seed: int = 0):
    """Class means `separation` apart (in scale) plus unit noise; same labels and noise for every separation."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    means = rng.normal(size=(classes, dim))
    return separation * means[labels] + rng.normal(size=(n, dim)), labels


def test_closed_form_equals_the_dense_gaussian_density():
    features, labels = small_problem(40, 5, seed=0)
    stats = EvidenceStats()
    stats.add(features, labels)
    spectrum = stats.spectrum()
    for alpha, beta in [(1.0, 1.0), (0.05, 20.0), (300.0, 3.0), (1e4, 0.01)]:
        closed = spectrum.log_evidence(alpha, beta)
        for k, label in enumerate(spectrum.labels):
            y = (labels == label).astype(np.float64)
            direct = dense_log_evidence(features, y, math.log(alpha), math.log(beta))
            assert closed[k] == pytest.approx(direct, rel=0, abs=1e-8 * max(1.0, abs(direct)))


@pytest.mark.parametrize(("n", "dim", "seed"), [(40, 5, 0), (40, 5, 3), (20, 50, 0), (30, 30, 4)])
def test_maximum_evidence_matches_direct_maximisation(n, dim, seed):
    """Per class and averaged: the fixed point reaches the maximum scipy finds on the dense density.

    (20, 50) is the D > n case; its class 0 has its maximum at the edge alpha -> inf (w = 0). In (30, 30) class
    2's evidence is so flat in alpha that MacKay's fixed point is still moving alpha after MAX_ITERATIONS
    steps (it reports converged=False); its L is right all the same.
    """
    features, labels = small_problem(n, dim, seed)
    stats = EvidenceStats()
    stats.add(features, labels)
    evidences = stats.class_evidence()
    assert [e.label for e in evidences] == [0, 1, 2]
    directs = []
    for e in evidences:
        y = (labels == e.label).astype(np.float64)
        direct, alpha, beta = direct_maximum(features, y)
        directs.append(direct)
        assert e.converged or e.iterations == MAX_ITERATIONS
        assert e.log_evidence == pytest.approx(direct, rel=1e-6)
        assert e.log_evidence >= direct - 1e-7 * abs(direct)  # no higher than the true maximum: it is the maximum
        if e.converged and alpha < 1e8 and beta < 1e8:  # an interior maximum: (alpha*, beta*) is determined
            assert (e.alpha, e.beta) == pytest.approx((alpha, beta), rel=1e-3)
    assert sum(e.converged for e in evidences) >= 2
    assert logme(features, labels) == pytest.approx(np.mean(directs) / n, rel=1e-6)


def test_separable_features_score_higher_than_noise():
    separable, labels = blobs(separation=5.0)
    noise = np.random.default_rng(1).normal(size=separable.shape)
    assert logme(separable, labels) > logme(noise, labels) + 0.1


def test_logme_increases_with_class_separation():
    scores = [logme(*blobs(separation)) for separation in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in zip(scores, scores[1:], strict=False)), scores


def test_chunked_accumulation_equals_one_shot():
    features, labels = blobs(separation=1.0, n=500, dim=24, classes=5)
    whole = EvidenceStats()
    whole.add(features, labels)
    chunked = EvidenceStats()
    bounds = [0, 1, 8, 8, 100, 317, 500]  # chunks of 1, 7, 0, 92, 217 and 183 rows
    for start, stop in zip(bounds, bounds[1:], strict=False):
        chunked.add(features[start:stop], labels[start:stop])
    assert chunked.n == whole.n == 500
    assert chunked.logme() == pytest.approx(whole.logme(), rel=1e-9)
    for a, b in zip(chunked.class_evidence(), whole.class_evidence(), strict=True):
        assert (a.label, a.count) == (b.label, b.count)
        assert a.log_evidence == pytest.approx(b.log_evidence, rel=1e-9)
        assert a.alpha == pytest.approx(b.alpha, rel=1e-6)


def test_row_order_does_not_matter():
    features, labels = blobs(separation=1.0)
    order = np.random.default_rng(7).permutation(len(labels))
    assert logme(features[order], labels[order]) == pytest.approx(logme(features, labels), rel=1e-10)


@pytest.mark.parametrize(("n", "dim"), [(200, 10), (20, 50), (30, 30)])
def test_more_dims_than_rows_and_the_reverse(n, dim):
    features, labels = small_problem(n, dim, seed=4)
    score = logme(features, labels)
    assert math.isfinite(score)
    evidences = _evidences(features, labels)
    assert len(evidences) == 3 and all(math.isfinite(e.log_evidence) for e in evidences)


def test_absent_classes_are_skipped():
    features, labels = blobs(separation=1.0, classes=2)
    stats = EvidenceStats(num_classes=5)
    stats.add(features, np.where(labels == 1, 3, 0))  # labels 1, 2 and 4 never occur
    assert [e.label for e in stats.class_evidence()] == [0, 3]
    assert stats.logme() == pytest.approx(logme(features, labels), rel=1e-12)


def test_features_uncorrelated_with_every_label_take_the_w_equals_0_limit():
    """All-zero features: F^T y = 0, the maximum is at alpha = inf, beta = n / count, in closed form."""
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    n = len(labels)
    evidences = _evidences(np.zeros((n, 4)), labels)
    for e in evidences:
        assert e.alpha == math.inf
        assert e.beta == pytest.approx(n / e.count)
        assert e.log_evidence == pytest.approx(n / 2 * (math.log(n / e.count) - math.log(2 * math.pi) - 1))


def test_deterministic_and_bounded():
    features, labels = small_problem(60, 8, seed=2)
    first, second = _evidences(features, labels), _evidences(features, labels)
    assert first == second
    capped = EvidenceStats()
    capped.add(features, labels)
    assert all(e.iterations <= 3 for e in capped.class_evidence(max_iterations=3))


def test_twenty_thousand_rows_in_chunks():
    """Scale check (no timing asserted): 20,000 x 1,280 float32 streamed in 4 chunks, memory O(D^2)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 20_000)
    stats = EvidenceStats(num_classes=10)
    for chunk in np.array_split(np.arange(20_000), 4):
        features = rng.random((len(chunk), 1280), dtype=np.float32)
        features[:, :10] += np.eye(10, dtype=np.float32)[labels[chunk]]  # ten informative dims
        stats.add(features, labels[chunk])
    evidences = stats.class_evidence()
    assert stats.n == 20_000 and stats.gram.shape == (1280, 1280)
    assert all(e.converged and math.isfinite(e.log_evidence) for e in evidences)
    assert math.isfinite(stats.logme())


@pytest.mark.parametrize(
    ("features", "labels", "message"),
    [
        (np.ones((5, 3)), np.zeros(5, dtype=int), "at least 2 classes"),
        (np.ones((1, 3)), np.zeros(1, dtype=int), "at least 2 rows"),
        (np.array([[1.0, np.nan], [0.0, 1.0], [2.0, 1.0]]), np.array([0, 1, 0]), "NaN or infinite values in 1 of 3"),
        (np.array([[1.0, np.inf], [0.0, 1.0]]), np.array([0, 1]), "NaN or infinite"),
        (np.ones((5, 3)), np.array([0, 1, 0, 1]), "same number of rows"),
        (np.ones(5), np.array([0, 1, 0, 1, 0]), "2-D array"),
        (np.ones((3, 2)), np.array([0.0, 1.0, 0.0]), "integer class indices"),
        (np.ones((3, 2)), np.array([0, -1, 1]), "must lie in 0..K-1"),
    ],
)
def test_errors_name_the_problem(features, labels, message):
    with pytest.raises(TransferabilityError, match=message) as caught:
        logme(features, labels)
    assert isinstance(caught.value, PipelineError)
    assert "\n" not in str(caught.value)


def test_chunks_must_agree():
    stats = EvidenceStats(num_classes=2)
    stats.add(np.ones((3, 4)), np.array([0, 1, 0]))
    with pytest.raises(TransferabilityError, match="4 feature columns"):
        stats.add(np.ones((3, 5)), np.array([0, 1, 0]))
    with pytest.raises(TransferabilityError, match=r"must lie in 0\.\.1"):
        stats.add(np.ones((2, 4)), np.array([0, 2]))


def test_module_imports_no_heavy_libraries():
    """The module is imported by a stage that must start fast: numpy only (plus pipeline.core.errors)."""
    code = (
        "import sys, pipeline.features.transferability; "
        "print(sorted(m for m in ('torch', 'scipy', 'sklearn', 'pandas') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _evidences(features: np.ndarray, labels: np.ndarray):
    stats = EvidenceStats()
    stats.add(features, labels)
    return stats.class_evidence()
