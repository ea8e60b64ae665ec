"""peftkit.monitor.stats against scipy (the oracle) and against simulation: each test's error rates are
what its level promises, on seeded data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sp

from peftkit.monitor.stats import bootstrap_difference, ks_2samp, mmd_test, psi, sample_size, two_proportions


@pytest.mark.parametrize("seed", range(5))
def test_ks_equals_scipys_statistic_and_kolmogorov_p(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=40 + 10 * seed)
    b = rng.normal(0.3 * seed, 1.0, size=70)
    if seed % 2:  # ties, as prompt lengths in tokens have
        a, b = np.round(a * 3), np.round(b * 3)
    d, p = ks_2samp(a, b)
    exact = sp.ks_2samp(a, b, method="exact")
    assert d == pytest.approx(exact.statistic, abs=1e-12)
    en = math.sqrt(len(a) * len(b) / (len(a) + len(b)))
    assert p == pytest.approx(sp.kstwobign.sf((en + 0.12 + 0.11 / en) * d), rel=1e-9)  # Kolmogorov's
    assert p == pytest.approx(exact.pvalue, abs=0.01)


@pytest.mark.parametrize(
    ("k_a", "n_a", "k_b", "n_b"), [(30, 100, 45, 100), (5, 200, 9, 150), (10, 10, 3, 10)]
)
def test_two_proportions_p_is_the_chi_squared_tests(k_a: int, n_a: int, k_b: int, n_b: int) -> None:
    table = [[k_a, n_a - k_a], [k_b, n_b - k_b]]
    chi2 = sp.chi2_contingency(table, correction=False)
    c = two_proportions(k_a, n_a, k_b, n_b)
    assert c.p == pytest.approx(chi2.pvalue, rel=1e-9)
    assert c.difference == pytest.approx(k_b / n_b - k_a / n_a)
    se = math.sqrt(c.a * (1 - c.a) / n_a + c.b * (1 - c.b) / n_b)
    assert (c.high - c.low) / 2 == pytest.approx(sp.norm.ppf(0.975) * se)


def test_the_sample_size_gives_the_power_it_promises() -> None:
    p_a, p_b = 0.2, 0.3
    n = sample_size(p_a, p_b)
    rng = np.random.default_rng(0)
    trials = 2000
    rejected = sum(
        two_proportions(rng.binomial(n, p_a), n, rng.binomial(n, p_b), n).p < 0.05 for _ in range(trials)
    )
    assert 0.77 <= rejected / trials <= 0.83  # 80% power, within simulation error
    assert sample_size(p_a, p_b, power=0.9) > n > sample_size(p_a, 0.4)


def test_psi_is_near_zero_for_one_distribution_and_large_for_a_shift() -> None:
    rng = np.random.default_rng(1)
    ref = rng.normal(size=2000)
    assert psi(ref, rng.normal(size=2000)) < 0.02
    assert psi(ref, rng.normal(1.0, 1.0, size=2000)) > 0.25
    # by hand: deciles of 0..99 are 10 equal bins; putting everything into the top bin gives
    # 9 * (1e-4 - 0.1) * ln(1e-4 / 0.1) + (1 - 0.1) * ln(1 / 0.1)
    hand = 9 * (1e-4 - 0.1) * math.log(1e-4 / 0.1) + 0.9 * math.log(10)
    assert psi(np.arange(100), np.full(50, 99.0)) == pytest.approx(hand)
    # a constant reference (every dates answer is 8 tokens) still sees longer outputs: their own bin
    assert psi(np.full(80, 8.0), np.full(40, 16.0)) == pytest.approx((1 - 1e-4) * math.log(1 / 1e-4) * 2)


def test_mmd_keeps_its_false_alarm_rate_and_sees_a_shift_in_few_dimensions() -> None:
    alarms = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        _, _, p = mmd_test(rng.normal(size=(40, 8)), rng.normal(size=(40, 8)), permutations=100, seed=seed)
        alarms += p < 0.05
    assert alarms <= 6  # 5% of 40 is 2; 6 or more has probability < 1.5% if the test holds its level
    rng = np.random.default_rng(99)
    x, y = rng.normal(size=(60, 16)), rng.normal(size=(60, 16))
    y[:, :2] += 0.8  # a shift in two of sixteen directions
    mmd2, threshold, p = mmd_test(x, y, alpha=0.01)
    assert mmd2 > threshold and p < 0.01


def test_bootstrap_interval_covers_the_truth_and_p_agrees_with_welch() -> None:
    rng = np.random.default_rng(3)
    covered = 0
    for seed in range(100):
        r = np.random.default_rng(seed)
        c = bootstrap_difference(r.exponential(1.0, 80), r.exponential(1.5, 90), resamples=500, seed=seed)
        covered += c.low <= 0.5 <= c.high
    assert covered >= 88  # a 95% interval (percentile intervals run a little narrow on skewed data)
    a, b = rng.normal(0, 1, 200), rng.normal(0.25, 1, 200)
    c = bootstrap_difference(a, b, resamples=4000)
    assert c.p == pytest.approx(sp.ttest_ind(a, b, equal_var=False).pvalue, abs=0.02)
