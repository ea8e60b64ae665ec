"""The statistics the monitor decides by: plain functions over numbers, no model and no database.

    psi(reference, current)                 # population stability index over the reference's deciles
    ks_2samp(a, b)                          # (D, p): the two-sample Kolmogorov-Smirnov test
    mmd_test(x, y, alpha=0.01)              # (MMD², its permutation threshold, p) with an RBF kernel
    two_proportions(k1, n1, k2, n2)         # difference, 95% interval and p of two rates
    bootstrap_difference(a, b)              # the same for the means of two samples
    sample_size(p1, p2)                     # per arm, to see p1 vs p2 at alpha 0.05 with 80% power

scipy (a test dependency) is the oracle for the tests of each; peftkit itself does not need it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np

_NORMAL = NormalDist()


def psi(reference: Sequence[float], current: Sequence[float], bins: int = 10, floor: float = 1e-4) -> float:
    """Population stability index of `current` against `reference`: sum over bins of
    (c - r) * ln(c / r), with bins at the reference's deciles (fewer when values repeat) and one each
    below and above its range, every share floored at `floor` so an empty bin is a large term, not an
    infinite one. Below 0.1 is
    usually read as stable, 0.1-0.25 as a moderate shift, above 0.25 as a significant one."""
    ref, cur = np.asarray(reference, dtype=float), np.asarray(current, dtype=float)
    if ref.size == 0 or cur.size == 0:
        raise ValueError("psi needs values on both sides")
    # Edges at the reference's deciles, plus its minimum and just above its maximum: values outside the
    # reference's range get bins of their own (so a constant reference still sees longer outputs).
    inner = np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1])
    edges = np.unique(np.concatenate([[ref.min()], inner, [np.nextafter(ref.max(), np.inf)]]))
    r = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=edges.size + 1) / ref.size
    c = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=edges.size + 1) / cur.size
    r, c = np.maximum(r, floor), np.maximum(c, floor)
    return float(np.sum((c - r) * np.log(c / r)))


def kolmogorov_sf(x: float) -> float:
    """P(K > x) for the Kolmogorov distribution: 2 * sum_j (-1)^(j-1) exp(-2 j² x²)."""
    if x <= 0:
        return 1.0
    if x < 0.2:  # the series converges slowly there, and the survival function is 1 to double precision
        return 1.0
    total = sum((-1) ** (j - 1) * math.exp(-2 * j * j * x * x) for j in range(1, 101))
    return min(1.0, max(0.0, 2 * total))


def ks_2samp(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """(D, p) of the two-sample Kolmogorov-Smirnov test: D the largest gap between the two empirical
    distribution functions, p from the Kolmogorov distribution at (e + 0.12 + 0.11 / e) D with
    e = sqrt(n m / (n + m)) (Stephens' small-sample correction: within 0.01 of the exact p here)."""
    x, y = np.sort(np.asarray(a, dtype=float)), np.sort(np.asarray(b, dtype=float))
    if x.size == 0 or y.size == 0:
        raise ValueError("ks_2samp needs values on both sides")
    pooled = np.concatenate([x, y])
    gap = (
        np.searchsorted(x, pooled, side="right") / x.size - np.searchsorted(y, pooled, side="right") / y.size
    )
    d = float(np.max(np.abs(gap)))
    en = math.sqrt(x.size * y.size / (x.size + y.size))
    return d, kolmogorov_sf((en + 0.12 + 0.11 / en) * d)


def mmd_test(
    x: np.ndarray, y: np.ndarray, alpha: float = 0.01, permutations: int = 200, seed: int = 0
) -> tuple[float, float, float]:
    """(MMD², threshold, p): the unbiased squared maximum mean discrepancy between the rows of `x` (n, d)
    and `y` (m, d) under an RBF kernel whose width is the median distance between all rows, the
    (1 - alpha) quantile of MMD² over `permutations` random relabellings of the pooled rows (the
    statistic exceeds it with probability alpha when both come from one distribution), and the
    permutation p-value."""
    pooled = np.concatenate([np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)])  # (N, d)
    n = len(x)
    sq = np.sum(pooled**2, axis=1)
    dist2 = np.maximum(sq[:, None] + sq[None, :] - 2 * pooled @ pooled.T, 0.0)  # (N, N)
    upper = dist2[np.triu_indices(len(pooled), k=1)]
    width2 = float(np.median(upper[upper > 0])) if np.any(upper > 0) else 1.0
    kernel = np.exp(-dist2 / width2)  # (N, N)
    observed = _mmd2(kernel, np.arange(len(pooled)) < n)
    rng = np.random.default_rng(seed)
    null = np.array([_mmd2(kernel, rng.permutation(len(pooled)) < n) for _ in range(permutations)])
    threshold = float(np.quantile(null, 1 - alpha))
    p = (1 + int(np.sum(null >= observed))) / (1 + permutations)
    return observed, threshold, p


def _mmd2(kernel: np.ndarray, first: np.ndarray) -> float:
    """Unbiased MMD² for the split of the kernel matrix's rows into `first` and the rest."""
    a, b = np.flatnonzero(first), np.flatnonzero(~first)
    kaa, kbb, kab = kernel[np.ix_(a, a)], kernel[np.ix_(b, b)], kernel[np.ix_(a, b)]
    n, m = len(a), len(b)
    return float(
        (kaa.sum() - np.trace(kaa)) / (n * (n - 1))
        + (kbb.sum() - np.trace(kbb)) / (m * (m - 1))
        - 2 * kab.mean()
    )


@dataclass(frozen=True)
class Comparison:
    """B against A on one measure: their values, B - A with a 95% interval, and the p-value of no difference."""

    a: float
    b: float
    difference: float
    low: float
    high: float
    p: float
    n_a: int
    n_b: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def two_proportions(k_a: int, n_a: int, k_b: int, n_b: int, confidence: float = 0.95) -> Comparison:
    """Rates k/n of two groups: the two-proportion z-test (pooled standard error) for p, and the Wald
    interval (unpooled) for the difference."""
    if n_a < 1 or n_b < 1:
        raise ValueError("two_proportions needs at least one trial in each group")
    pa, pb = k_a / n_a, k_b / n_b
    pooled = (k_a + k_b) / (n_a + n_b)
    se0 = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    p = 1.0 if se0 == 0 else math.erfc(abs(pb - pa) / se0 / math.sqrt(2))
    se = math.sqrt(pa * (1 - pa) / n_a + pb * (1 - pb) / n_b)
    z = _NORMAL.inv_cdf(0.5 + confidence / 2)
    return Comparison(pa, pb, pb - pa, pb - pa - z * se, pb - pa + z * se, p, n_a, n_b)


def bootstrap_difference(
    a: Sequence[float], b: Sequence[float], resamples: int = 2000, seed: int = 0, confidence: float = 0.95
) -> Comparison:
    """Means of two samples: the percentile bootstrap interval of mean(b) - mean(a) (each group resampled
    with replacement), and a two-sided bootstrap p-value of no difference (twice the smaller share of
    resampled differences on either side of 0)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.size < 2 or y.size < 2:
        raise ValueError("bootstrap_difference needs at least two values in each group")
    rng = np.random.default_rng(seed)
    diffs = y[rng.integers(0, y.size, (resamples, y.size))].mean(axis=1) - x[
        rng.integers(0, x.size, (resamples, x.size))
    ].mean(axis=1)  # (resamples,)
    tail = (1 - confidence) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    p = min(1.0, 2 * min(np.mean(diffs <= 0), np.mean(diffs >= 0)))
    return Comparison(float(x.mean()), float(y.mean()), float(y.mean() - x.mean()), float(low), float(high),
                      float(p), int(x.size), int(y.size))  # fmt: skip


def sample_size(p_a: float, p_b: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Trials per group for a two-sided two-proportion test at `alpha` to detect rates p_a vs p_b with
    `power`: ((z_{1-a/2} sqrt(2 p̄ q̄) + z_power sqrt(p_a q_a + p_b q_b)) / (p_a - p_b))²."""
    if p_a == p_b:
        raise ValueError("sample_size needs two different rates")
    za, zb = _NORMAL.inv_cdf(1 - alpha / 2), _NORMAL.inv_cdf(power)
    mean = (p_a + p_b) / 2
    top = za * math.sqrt(2 * mean * (1 - mean)) + zb * math.sqrt(p_a * (1 - p_a) + p_b * (1 - p_b))
    return math.ceil((top / (p_a - p_b)) ** 2)
