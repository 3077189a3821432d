"""All statistics the tool computes, in one place."""

from __future__ import annotations

import math

import numpy as np


def auc(labels, scores) -> float:
    """Area under the ROC curve via the rank-sum (Mann-Whitney) identity; ties get mid-ranks.

    Returns NaN when only one class is present.
    """
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _midranks(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    boundaries = np.flatnonzero(np.diff(sorted_x)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(x)]])
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return ranks


def bootstrap_median_interval(samples, confidence: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval for the median of `samples` (seeded: reproducible).

    With a single sample the interval is that sample on both sides.
    """
    x = np.asarray(samples, dtype=np.float64)
    if len(x) == 0:
        return float("nan"), float("nan")
    if len(x) == 1:
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    medians = np.median(x[rng.integers(0, len(x), size=(resamples, len(x)))], axis=1)
    alpha = (1.0 - confidence) / 2.0
    return float(np.quantile(medians, alpha)), float(np.quantile(medians, 1.0 - alpha))


def coefficient_of_variation(samples) -> float:
    """Sample standard deviation over the mean (NaN for fewer than 2 samples)."""
    x = np.asarray(samples, dtype=np.float64)
    if len(x) < 2 or x.mean() == 0:
        return float("nan")
    return float(x.std(ddof=1) / x.mean())


def percentiles(samples, qs=(50, 90, 99)) -> dict[str, float]:
    x = np.asarray(samples, dtype=np.float64)
    if len(x) == 0:
        return {f"p{q}": float("nan") for q in qs}
    return {f"p{q}": float(np.percentile(x, q)) for q in qs}


NOISY_CV = 0.05  # a throughput whose windows vary more than this is flagged as noisy


def is_noisy(cv) -> bool:
    """True for a known CV above NOISY_CV (None and NaN are not noisy: nothing to judge)."""
    return cv is not None and not (isinstance(cv, float) and math.isnan(cv)) and cv > NOISY_CV


def summarize_throughput(window_samples_per_sec) -> dict[str, float]:
    """Median, 95% bootstrap interval and CV of per-window throughputs."""
    low, high = bootstrap_median_interval(window_samples_per_sec)
    return {
        "median": float(np.median(window_samples_per_sec)) if len(window_samples_per_sec) else float("nan"),
        "low": low,
        "high": high,
        "cv": coefficient_of_variation(window_samples_per_sec),
    }


def bootstrap_ratio_interval(baseline, current, confidence: float = 0.95, resamples: int = 2000,
                             seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of median(current) / median(baseline), resampling the
    windows of each run independently (seeded: the same inputs give the same interval)."""
    a = np.asarray(baseline, dtype=np.float64)
    b = np.asarray(current, dtype=np.float64)
    rng = np.random.default_rng(seed)
    med_a = np.median(a[rng.integers(0, len(a), size=(resamples, len(a)))], axis=1)
    med_b = np.median(b[rng.integers(0, len(b), size=(resamples, len(b)))], axis=1)
    ratios = med_b / med_a
    alpha = (1.0 - confidence) / 2.0
    return float(np.quantile(ratios, alpha)), float(np.quantile(ratios, 1.0 - alpha))


def _u_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """U of sample `a`: pairs (x in a, y in b) with x > y, ties counting one half."""
    ranks = _midranks(np.concatenate([a, b]))
    return float(ranks[: len(a)].sum() - len(a) * (len(a) + 1) / 2.0)


def _exact_u_counts(n: int, m: int) -> np.ndarray:
    """How many of the C(n+m, n) orderings give each U = 0..n*m (no ties)."""
    # counts[i][j] is the distribution for sample sizes (i, j); built up row by row.
    prev = [np.ones(1, dtype=np.float64) for _ in range(m + 1)]  # i = 0: U is always 0
    for i in range(1, n + 1):
        cur = [np.ones(1, dtype=np.float64)]  # j = 0
        for j in range(1, m + 1):
            size = i * j + 1
            dist = np.zeros(size)
            # the largest value is from sample a (adds j to U) or from sample b (adds 0)
            from_a = prev[j]
            dist[j : j + len(from_a)] += from_a
            from_b = cur[j - 1]
            dist[: len(from_b)] += from_b
            cur.append(dist)
        prev = cur
    return prev[m]


EXACT_LIMIT = 50  # exact distribution up to this many observations per sample


def mann_whitney_p(a, b) -> float:
    """Two-sided Mann-Whitney U test p-value.

    Exact (enumerating the null distribution) when both samples have at most
    EXACT_LIMIT values and no ties; otherwise the normal approximation with tie
    correction and continuity correction (as scipy's `method="asymptotic"`).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    n, m = len(a), len(b)
    if n == 0 or m == 0:
        return float("nan")
    u = _u_statistic(a, b)
    combined = np.concatenate([a, b])
    has_ties = len(np.unique(combined)) < len(combined)
    if not has_ties and n <= EXACT_LIMIT and m <= EXACT_LIMIT:
        counts = _exact_u_counts(n, m)
        total = counts.sum()
        u_int = int(round(u))
        lower = counts[: u_int + 1].sum() / total
        upper = counts[u_int:].sum() / total
        return float(min(1.0, 2.0 * min(lower, upper)))
    mean = n * m / 2.0
    _, tie_counts = np.unique(combined, return_counts=True)
    total = n + m
    tie_term = float((tie_counts**3 - tie_counts).sum()) / (total * (total - 1))
    variance = n * m / 12.0 * ((total + 1) - tie_term)
    if variance <= 0:
        return 1.0  # every value tied: no evidence of a difference
    z = (abs(u - mean) - 0.5) / math.sqrt(variance)
    return float(min(1.0, math.erfc(max(z, 0.0) / math.sqrt(2.0))))


def mann_whitney_min_p(n: int, m: int) -> float:
    """The smallest two-sided p the exact test can give with n and m windows: 2 / C(n+m, n)."""
    if n == 0 or m == 0:
        return 1.0
    return min(1.0, 2.0 / math.comb(n + m, n))
