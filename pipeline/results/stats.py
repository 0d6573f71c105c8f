"""Uncertainty of test scores and paired comparison of two models scored on the same test images."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest, norm, rankdata
from scipy.stats import t as student_t


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion such as accuracy = `successes` / `n`.

    Chosen over the normal (Wald) interval because it keeps close to its nominal coverage on small test sets
    and near 0 or 1, where Wald collapses to a zero-width interval. z comes from `scipy.stats.norm.ppf`; the
    result equals `scipy.stats.binomtest(successes, n).proportion_ci(confidence, method="wilson")`, computed
    directly here so that n == 0 has an answer: nothing was measured, so every proportion is possible, (0, 1).
    """
    _check_confidence(confidence)
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    z = float(norm.ppf(0.5 + confidence / 2))
    p = successes / n
    shrink = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / shrink
    half = z / shrink * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # At p = 0 the lower bound is exactly 0 and at p = 1 the upper is exactly 1; rounding would miss them.
    low = 0.0 if successes == 0 else max(0.0, float(center - half))
    high = 1.0 if successes == n else min(1.0, float(center + half))
    return low, high


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """Student's t interval of the mean of `values` (independent runs, e.g. one test accuracy per few-shot seed):
    mean +- t(n - 1) * s / sqrt(n), s the sample standard deviation (ddof 1), t from `scipy.stats.t`. None for one
    value: a single run has no spread to measure. Identical values give the zero-width interval (mean, mean)."""
    _check_confidence(confidence)
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return None
    mean, sem = float(x.mean()), float(x.std(ddof=1) / np.sqrt(x.size))
    if sem == 0.0:  # scipy wants a positive scale
        return mean, mean
    low, high = student_t.interval(confidence, x.size - 1, loc=mean, scale=sem)
    return float(low), float(high)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Unweighted mean of per-class F1 over all `n_classes` classes, a class absent from both counting 0.

    Equals `sklearn.metrics.f1_score(y_true, y_pred, average="macro", labels=range(n_classes),
    zero_division=0)` (tests check it). Written by hand from a bincount confusion matrix because the bootstrap
    calls it thousands of times, and sklearn's checks its inputs and finds the labels again on every call.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    cm = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    tp = np.diag(cm)
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (true count + predicted count); 0 where the class never occurs.
    denominator = cm.sum(axis=1) + cm.sum(axis=0)
    f1 = np.divide(2 * tp, denominator, out=np.zeros(n_classes), where=denominator > 0)
    return float(f1.mean())


def _paired_arrays(a: np.ndarray, b: np.ndarray, names: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 1 or b.ndim != 1 or len(a) != len(b):
        raise ValueError(
            f"{names} must be 1-D arrays over the same test images in the same order, "
            f"got shapes {a.shape} and {b.shape}"
        )
    if len(a) == 0:
        raise ValueError(f"{names} are empty: there are no test images to measure")
    return a, b


def bootstrap_interval(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    statistic: Callable[[np.ndarray, np.ndarray], float],
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic(y_true, y_pred)` over test images.

    Each resample draws len(y_true) image indices with replacement from `np.random.default_rng(seed)` and
    applies the same indices to both arrays, so the interval is deterministic for a seed. Resampling images
    (not classes) treats the test set as a sample of the images the model will meet. One resample at a time:
    drawing the indices of many resamples at once was no faster and needs far more memory.
    """
    _check_confidence(confidence)
    y_true, y_pred = _paired_arrays(y_true, y_pred, "y_true and y_pred")
    rng = np.random.default_rng(seed)
    n = len(y_true)
    values = np.empty(n_resamples)
    for r in range(n_resamples):
        idx = rng.integers(0, n, size=n)
        values[r] = statistic(y_true[idx], y_pred[idx])
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return float(low), float(high)


def _correctness(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = _paired_arrays(correct_a, correct_b, "correct_a and correct_b")
    if a.dtype != bool or b.dtype != bool:
        raise ValueError(
            f"correct_a and correct_b must be boolean arrays (e.g. y_pred == y_true), got {a.dtype} and {b.dtype}"
        )
    return a, b


@dataclass(frozen=True)
class McNemar:
    """Discordant pairs of two models on the same images, and the exact McNemar p-value."""

    a_only: int  # images model a gets right and model b gets wrong
    b_only: int  # images model b gets right and model a gets wrong
    p_value: float


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> McNemar:
    """Exact McNemar test: do two models scored on the SAME images differ in accuracy?

    Only images where exactly one model is right carry information; under "no difference" each such image is a
    fair coin, so the p-value is the exact two-sided binomial test of a_only out of a_only + b_only at 0.5
    (`scipy.stats.binomtest`). Exact rather than chi-squared because small test sets have few discordant
    pairs. With no discordant pairs the models cannot be told apart: p = 1.
    """
    a, b = _correctness(correct_a, correct_b)
    a_only = int(np.count_nonzero(a & ~b))
    b_only = int(np.count_nonzero(~a & b))
    if a_only + b_only == 0:
        return McNemar(a_only, b_only, 1.0)
    return McNemar(a_only, b_only, float(binomtest(a_only, a_only + b_only, 0.5).pvalue))


def paired_difference_interval(test: McNemar, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact conditional interval of accuracy(a) - accuracy(b) on the same n images, dual to McNemar's test.

    Given the d = a_only + b_only images where the models disagree, a_only is Binomial(d, pi), and the difference
    is (d / n) * (2 * pi - 1). The Clopper-Pearson interval of pi, mapped through that line, gives the interval.
    For pi0 = 0.5 the binomial is symmetric, so the two-sided exact test rejects at level alpha exactly when this
    interval at confidence 1 - alpha excludes 0: the interval and the verdict cannot disagree (a bootstrap
    interval can, with few discordant images). With no disagreement the difference is 0, exactly.
    """
    _check_confidence(confidence)
    d = test.a_only + test.b_only
    if d == 0:
        return 0.0, 0.0
    ci = binomtest(test.a_only, d, 0.5).proportion_ci(confidence_level=confidence, method="exact")
    return d / n * (2 * ci.low - 1), d / n * (2 * ci.high - 1)


@dataclass(frozen=True)
class Comparison:
    """Two models on the same test images: accuracies, their difference with a paired interval, and a verdict."""

    accuracy_a: float
    accuracy_b: float
    difference: float  # accuracy_a - accuracy_b
    interval: tuple[float, float]  # exact conditional interval of the difference (dual to the McNemar test)
    mcnemar: McNemar
    verdict: str  # "a", "b" or "none"


def compare(correct_a: np.ndarray, correct_b: np.ndarray, *, alpha: float = 0.05) -> Comparison:
    """Compare two models scored on the same test images (boolean "was this image right" arrays).

    Verdict rule: "a" when the exact McNemar p-value is below `alpha` and a is more accurate, "b" when it is
    below `alpha` and b is more accurate, otherwise "none" (no measurable difference on this test set). The
    interval (confidence 1 - alpha) is the test's dual: it excludes 0 exactly when the verdict is not "none".
    """
    a, b = _correctness(correct_a, correct_b)
    test = mcnemar_exact(a, b)
    difference = float(a.mean() - b.mean())
    verdict = "none"
    if test.p_value < alpha:
        verdict = "a" if difference > 0 else "b"
    interval = paired_difference_interval(test, len(a), confidence=1.0 - alpha)
    return Comparison(float(a.mean()), float(b.mean()), difference, interval, test, verdict)


def rank_correlation(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation of two paired lists: Pearson's correlation of their ranks, tied values
    sharing their average rank; nan when either list has a single distinct value (no order to compare)."""
    ranks_a, ranks_b = rankdata(a), rankdata(b)
    if np.ptp(ranks_a) == 0 or np.ptp(ranks_b) == 0:
        return float("nan")
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])
