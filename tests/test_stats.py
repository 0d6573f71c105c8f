"""pipeline.results.stats: Wilson and bootstrap intervals, macro-F1, exact McNemar and the paired comparison."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from scipy.stats import binom, binomtest
from sklearn.metrics import f1_score

from pipeline.results.stats import (
    Comparison,
    McNemar,
    bootstrap_interval,
    compare,
    macro_f1,
    mcnemar_exact,
    paired_difference_interval,
    rank_correlation,
    wilson_interval,
)

Z95 = 1.959963984540054  # standard normal quantile at 0.975, from tables


def _wilson_by_hand(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's definition: the p whose score test |p_hat - p| / sqrt(p(1-p)/n) equals z.

    Squaring gives the quadratic (1 + z²/n) p² - (2 p_hat + z²/n) p + p_hat² = 0; its two roots are the bounds.
    A different route from the centre +- half-width form in the module.
    """
    p_hat = k / n
    a, b, c = 1 + z * z / n, -(2 * p_hat + z * z / n), p_hat * p_hat
    root = math.sqrt(b * b - 4 * a * c)
    return (-b - root) / (2 * a), (-b + root) / (2 * a)


@pytest.mark.parametrize(("k", "n"), [(36, 37), (145, 153), (0, 10), (10, 10), (1, 2)])
def test_wilson_matches_definition(k, n):
    low, high = wilson_interval(k, n)
    want_low, want_high = _wilson_by_hand(k, n)
    assert low == pytest.approx(want_low, abs=1e-9)
    assert high == pytest.approx(want_high, abs=1e-9)
    ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
    assert (low, high) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_wilson_edges_and_bad_input():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10)[1] == 1.0
    # A higher confidence gives a wider interval.
    assert np.diff(wilson_interval(90, 100, 0.99)) > np.diff(wilson_interval(90, 100, 0.95))
    with pytest.raises(ValueError, match="successes <= n"):
        wilson_interval(11, 10)
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(5, 10, confidence=95)


def test_wilson_coverage_is_close_to_nominal():
    rng = np.random.default_rng(0)
    n, p = 100, 0.9
    intervals = [wilson_interval(int(k), n) for k in rng.binomial(n, p, size=2000)]
    coverage = np.mean([low <= p <= high for low, high in intervals])
    assert 0.92 <= coverage <= 0.98
    # The exact coverage, summed over every outcome k: 0.936 here (Wilson dips a little below nominal at p = 0.9).
    covered = [k for k in range(n + 1) if wilson_interval(k, n)[0] <= p <= wilson_interval(k, n)[1]]
    assert 0.93 <= binom.pmf(covered, n, p).sum() <= 0.96


def _accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(y_true == y_pred))


def _ninety_percent_right(n: int) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.zeros(n, dtype=int)
    y_pred = np.zeros(n, dtype=int)
    y_pred[: n // 10] = 1
    return y_true, y_pred


def test_bootstrap_is_deterministic_and_contains_the_estimate():
    y_true, y_pred = _ninety_percent_right(200)
    first = bootstrap_interval(y_true, y_pred, _accuracy, seed=3)
    assert bootstrap_interval(y_true, y_pred, _accuracy, seed=3) == first
    assert bootstrap_interval(y_true, y_pred, _accuracy, seed=4) != first
    assert first[0] < 0.9 < first[1]


def test_bootstrap_narrows_as_the_test_set_grows():
    small = bootstrap_interval(*_ninety_percent_right(50), _accuracy)
    large = bootstrap_interval(*_ninety_percent_right(5000), _accuracy)
    assert small[0] <= 0.9 <= small[1] and large[0] <= 0.9 <= large[1]
    # Width shrinks like 1/sqrt(n): a factor of 10 here.
    assert (large[1] - large[0]) < (small[1] - small[0]) / 5


def test_bootstrap_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="same test images"):
        bootstrap_interval(np.zeros(3), np.zeros(4), _accuracy)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_macro_f1_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    n_classes = 6
    # Class 4 is never predicted, class 5 occurs in neither array: both count as F1 = 0 in the mean.
    y_true = rng.integers(0, 5, size=300)
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, 4, size=300))
    y_pred[y_pred == 4] = 0
    want = f1_score(y_true, y_pred, average="macro", labels=np.arange(n_classes), zero_division=0)
    assert macro_f1(y_true, y_pred, n_classes) == pytest.approx(want, abs=1e-12)


def test_bootstrap_of_macro_f1_contains_the_estimate():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 3, size=500)
    y_pred = np.where(rng.random(500) < 0.7, y_true, rng.integers(0, 3, size=500))
    statistic = functools.partial(macro_f1, n_classes=3)
    low, high = bootstrap_interval(y_true, y_pred, statistic, n_resamples=500)
    assert low < statistic(y_true, y_pred) < high


def _pairs(a_only: int, b_only: int, both: int, neither: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Correctness arrays with the given counts of each (a right?, b right?) combination, shuffled."""
    a = np.array([True] * a_only + [False] * b_only + [True] * both + [False] * neither)
    b = np.array([False] * a_only + [True] * b_only + [True] * both + [False] * neither)
    order = np.random.default_rng(0).permutation(len(a))
    return a[order], b[order]


def test_mcnemar_counts_and_exact_p_value():
    result = mcnemar_exact(*_pairs(a_only=0, b_only=10, both=40, neither=5))
    assert (result.a_only, result.b_only) == (0, 10)
    assert result.p_value == pytest.approx(2 * 0.5**10, rel=1e-12)
    assert mcnemar_exact(*_pairs(a_only=3, b_only=0, both=0)).p_value == pytest.approx(2 * 0.5**3)


def test_identical_models_have_p_one_and_no_verdict():
    correct = np.random.default_rng(0).random(153) < 0.9
    result = compare(correct, correct.copy())
    assert result.mcnemar.p_value == 1.0
    assert result.difference == 0.0
    assert result.interval == (0.0, 0.0)
    assert result.verdict == "none"


def test_one_discordant_image_in_153_is_no_difference():
    # 145/153 = 94.8% against 144/153 = 94.1%: the real case from the report.
    result = compare(*_pairs(a_only=1, b_only=0, both=144, neither=8))
    assert isinstance(result, Comparison)
    assert (result.accuracy_a, result.accuracy_b) == pytest.approx((145 / 153, 144 / 153))
    assert result.mcnemar.p_value == 1.0
    assert result.verdict == "none"
    assert result.interval[0] <= 0.0 <= result.interval[1]


def test_clearly_better_model_wins():
    a, b = _pairs(a_only=30, b_only=2, both=150, neither=18)
    result = compare(a, b)
    assert result.mcnemar.p_value < 1e-5
    assert result.verdict == "a"
    assert result.difference == pytest.approx(28 / 200)
    assert 0.0 < result.interval[0] < result.difference < result.interval[1]
    assert compare(b, a).verdict == "b"


@pytest.mark.parametrize("a_only", range(0, 13))
@pytest.mark.parametrize("b_only", [0, 1, 2, 5])
def test_the_paired_interval_excludes_zero_exactly_when_the_verdict_names_a_winner(a_only, b_only):
    """The review's case: 5 against 0 disagreements has p = 0.0625, and a bootstrap interval excluded 0."""
    result = compare(*_pairs(a_only=a_only, b_only=b_only, both=80, neither=13))
    excludes_zero = result.interval[0] > 0 or result.interval[1] < 0
    assert excludes_zero == (result.verdict != "none")
    assert result.interval[0] - 1e-12 <= result.difference <= result.interval[1] + 1e-12


def test_the_paired_interval_maps_clopper_pearson_onto_the_difference():
    test = McNemar(a_only=6, b_only=0, p_value=2 * 0.5**6)
    low, high = paired_difference_interval(test, n=269)
    # Clopper-Pearson for 6 of 6 at 95%: (0.025 ** (1 / 6), 1); the difference is 6/269 * (2 * pi - 1).
    assert low == pytest.approx(6 / 269 * (2 * 0.025 ** (1 / 6) - 1), rel=1e-9)
    assert high == pytest.approx(6 / 269)


def test_paired_inputs_are_checked():
    with pytest.raises(ValueError, match="same test images"):
        mcnemar_exact(np.ones(153, dtype=bool), np.ones(152, dtype=bool))
    with pytest.raises(ValueError, match="same test images"):
        compare(np.ones(5, dtype=bool), np.ones(6, dtype=bool))
    with pytest.raises(ValueError, match="boolean"):
        mcnemar_exact(np.array([0, 1, 2]), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="empty"):
        mcnemar_exact(np.array([], dtype=bool), np.array([], dtype=bool))


def test_rank_correlation_is_spearmans_with_average_ranks_for_ties():
    assert rank_correlation([0.1, 0.5, 0.9], [10, 20, 30]) == pytest.approx(1.0)
    assert rank_correlation([0.1, 0.5, 0.9], [30, 20, 10]) == pytest.approx(-1.0)
    # 1 - 6 * sum(d^2) / (n (n^2 - 1)) without ties: ranks (1, 2, 3, 4) against (2, 1, 4, 3): d^2 = 4, rho = 0.6.
    assert rank_correlation([1, 2, 3, 4], [2, 1, 4, 3]) == pytest.approx(0.6)
    # Ties share their mean rank: ranks (1.5, 1.5, 3) against (1, 2, 3): Pearson of the ranks is sqrt(3) / 2.
    assert rank_correlation([5, 5, 9], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)
    assert math.isnan(rank_correlation([1, 1, 1], [1, 2, 3]))  # no order to compare
