"""All statistics the tool computes, in one place."""

from __future__ import annotations

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


def summarize_throughput(window_samples_per_sec) -> dict[str, float]:
    """Median, 95% bootstrap interval and CV of per-window throughputs."""
    low, high = bootstrap_median_interval(window_samples_per_sec)
    return {
        "median": float(np.median(window_samples_per_sec)) if len(window_samples_per_sec) else float("nan"),
        "low": low,
        "high": high,
        "cv": coefficient_of_variation(window_samples_per_sec),
    }
