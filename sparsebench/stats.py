"""All statistics the tool computes, in one place.

Throughput is measured in windows, and windows are grouped by the worker process that
measured them. The windows of one process share that process's luck (its memory layout,
the host's load that minute), so they are not independent samples of run-to-run noise:
only separate processes are. Every summary here therefore keeps the two levels apart:

- `summarize_processes` gives the median of all windows with a hierarchical bootstrap
  interval (resample processes, then windows within each), the within-process spread
  (how much one process's windows vary) and the between-process spread (how much the
  processes' medians vary). With one process the interval is the windows' bootstrap and
  says nothing of run-to-run noise (`run_to_run_measured` is False).
- `ratio_interval` does the same for the ratio of two cells' medians.
- `paired_test` decides an interleaved A/B comparison from per-round paired ratios.

Tests use scipy.stats (Mann-Whitney U, Wilcoxon signed-rank, the t distribution); the
bootstraps are written here because scipy has no hierarchical one. Every resampling is
seeded, so the same inputs always give the same interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


def _sps():
    """scipy.stats, imported on first use: it costs 1.2-1.7 s, paid otherwise by every
    command and worker that imports this module (`sparsebench --version` took 2 s) and
    needed only by those that test."""
    from scipy import stats

    return stats


RESAMPLES = 2000
NOISY_CV = 0.05  # a throughput whose windows vary more than this is flagged as noisy


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
    # Mid-ranks with NumPy alone (scipy.stats.rankdata's numbers): the worker computes this
    # and would otherwise import scipy.stats for it.
    _, position, ties = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(ties) - (ties - 1) / 2.0)[position.reshape(-1)]
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2.0
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1.0 - alpha))


def bootstrap_median_interval(samples, confidence: float = 0.95, resamples: int = RESAMPLES,
                              seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval for the median of `samples` (one level: the windows of
    one process). With a single sample the interval is that sample on both sides."""
    return hierarchical_median_interval([samples], confidence, resamples, seed)


def _as_groups(groups: Sequence[Sequence[float]]) -> list[np.ndarray]:
    return [np.asarray(g, dtype=np.float64) for g in groups if len(g)]


def _hierarchical_medians(groups: list[np.ndarray], resamples: int, rng: np.random.Generator) -> np.ndarray:
    """`resamples` medians of pooled windows, each drawn by resampling the groups (processes)
    with replacement, then each chosen group's windows with replacement."""
    n = len(groups)
    sizes = {len(g) for g in groups}
    if len(sizes) == 1:  # the usual case, vectorized: every process measured the same windows
        w = sizes.pop()
        table = np.stack(groups)  # [n, w]
        chosen = rng.integers(0, n, size=(resamples, n)) if n > 1 else np.zeros((resamples, 1), dtype=np.int64)
        picks = rng.integers(0, w, size=(resamples, n, w))
        return np.median(table[chosen[:, :, None], picks].reshape(resamples, n * w), axis=1)
    out = np.empty(resamples)
    for i in range(resamples):
        chosen = [groups[j] for j in rng.integers(0, n, size=n)] if n > 1 else groups
        pooled = np.concatenate([g[rng.integers(0, len(g), size=len(g))] for g in chosen])
        out[i] = np.median(pooled)
    return out


def hierarchical_median_interval(groups: Sequence[Sequence[float]], confidence: float = 0.95,
                                 resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Interval for the median of all windows, resampling processes then windows."""
    data = _as_groups(groups)
    if not data:
        return float("nan"), float("nan")
    if sum(len(g) for g in data) == 1:
        value = float(data[0][0])
        return value, value
    medians = _hierarchical_medians(data, resamples, np.random.default_rng(seed))
    return _percentile_interval(medians, confidence)


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


def is_noisy(cv) -> bool:
    """True for a known CV above NOISY_CV (None and NaN are not noisy: nothing to judge)."""
    return cv is not None and not (isinstance(cv, float) and math.isnan(cv)) and cv > NOISY_CV


def summarize_throughput(window_samples_per_sec) -> dict[str, float]:
    """Median, 95% bootstrap interval and CV of one process's windows."""
    low, high = bootstrap_median_interval(window_samples_per_sec)
    return {
        "median": float(np.median(window_samples_per_sec)) if len(window_samples_per_sec) else float("nan"),
        "low": low,
        "high": high,
        "cv": coefficient_of_variation(window_samples_per_sec),
    }


def summarize_processes(groups: Sequence[Sequence[float]]) -> dict[str, float | int | bool | None]:
    """One cell measured in one or more processes (a list of window lists).

    `median`: of all windows; `low`/`high`: 95% hierarchical bootstrap interval; `cv`: of
    all windows pooled; `within_cv`: the root-mean-square of each process's own CV;
    `between_cv`: CV of the processes' medians (None with one process);
    `run_to_run_measured`: whether more than one process was measured.
    """
    data = _as_groups(groups)
    if not data:
        return {"median": float("nan"), "low": float("nan"), "high": float("nan"), "cv": float("nan"),
                "within_cv": None, "between_cv": None, "processes": 0, "run_to_run_measured": False}
    pooled = np.concatenate(data)
    low, high = hierarchical_median_interval(data)
    within = [coefficient_of_variation(g) for g in data if len(g) > 1]
    within = [w for w in within if not math.isnan(w)]
    return {
        "median": float(np.median(pooled)),
        "low": low,
        "high": high,
        "cv": coefficient_of_variation(pooled),
        "within_cv": float(math.sqrt(np.mean(np.square(within)))) if within else None,
        "between_cv": coefficient_of_variation([np.median(g) for g in data]) if len(data) > 1 else None,
        "processes": len(data),
        "run_to_run_measured": len(data) > 1,
    }


def ratio_interval(baseline: Sequence[Sequence[float]], current: Sequence[Sequence[float]],
                   confidence: float = 0.95, resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """Interval of median(current) / median(baseline), each side resampled hierarchically
    (processes, then windows) and independently."""
    a, b = _as_groups(baseline), _as_groups(current)
    rng = np.random.default_rng(seed)
    ratios = _hierarchical_medians(b, resamples, rng) / _hierarchical_medians(a, resamples, rng)
    return _percentile_interval(ratios, confidence)


def bootstrap_ratio_interval(baseline, current, confidence: float = 0.95, resamples: int = RESAMPLES,
                             seed: int = 0) -> tuple[float, float]:
    """`ratio_interval` for two single processes' windows."""
    return ratio_interval([baseline], [current], confidence, resamples, seed)


def mann_whitney_p(a, b) -> float:
    """Two-sided Mann-Whitney U test p-value (scipy: exact for small samples without ties)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    if np.all(np.concatenate([a, b]) == a[0]):
        return 1.0  # every value tied: no evidence of a difference
    return float(_sps().mannwhitneyu(a, b, alternative="two-sided").pvalue)


def mann_whitney_min_p(n: int, m: int) -> float:
    """The smallest two-sided p the exact test can give with n and m samples: 2 / C(n+m, n)."""
    if n == 0 or m == 0:
        return 1.0
    return min(1.0, 2.0 / math.comb(n + m, n))


def welch_log_p(a, b) -> float:
    """Two-sided Welch t-test on the logs of two sets of per-process medians.

    Used where processes are the unit and there are too few of them for a rank test to
    ever reach a small p (3 against 3: Mann-Whitney's smallest p is 0.1)."""
    la, lb = np.log(np.asarray(a, dtype=np.float64)), np.log(np.asarray(b, dtype=np.float64))
    if len(la) < 2 or len(lb) < 2:
        return float("nan")
    if np.ptp(la) == 0 and np.ptp(lb) == 0:
        return 0.0 if la[0] != lb[0] else 1.0
    return float(_sps().ttest_ind(lb, la, equal_var=False).pvalue)


PAIRED_TESTS = ("t", "wilcoxon")


@dataclass
class PairedResult:
    """An interleaved A/B comparison of one cell over R rounds (ratio = B / A)."""

    rounds: int
    ratio: float  # geometric mean of the per-round ratios
    ratio_low: float  # 95% interval of that mean (t-based on the log ratios)
    ratio_high: float
    p_value: float
    detectable: float  # smallest |change| (as a fraction) this test could call at alpha
    log_sd: float  # standard deviation of the per-round log ratios


def paired_test(a: Sequence[float], b: Sequence[float], alpha: float = 0.05, test: str = "t") -> PairedResult:
    """Per-round paired throughputs of sides A and B (same length R): are they different?

    Works on the log ratios log(b_r / a_r), so a round's drift (which hits both sides of
    the round alike) cancels. `test`: a one-sample t-test of the mean log ratio against 0
    (the default: with 4-8 rounds it still has power), or the Wilcoxon signed-rank test
    (no normality assumption, but its smallest two-sided p is 2 / 2**R).
    `detectable`: the change at which the t-test would reach `alpha` given the spread of
    the log ratios seen (the noise floor of an A/A run).
    """
    if test not in PAIRED_TESTS:
        raise ValueError(f"unknown paired test {test!r}; known: {', '.join(PAIRED_TESTS)}")
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) != len(b) or len(a) == 0:
        raise ValueError("paired_test needs the same number (>= 1) of A and B measurements")
    logs = np.log(b / a)
    r = len(logs)
    mean = float(np.mean(logs))
    sd = float(np.std(logs, ddof=1)) if r > 1 else float("nan")
    if r < 2:
        return PairedResult(r, math.exp(mean), float("nan"), float("nan"), float("nan"), float("nan"), sd)
    t_crit = float(_sps().t.ppf(1.0 - alpha / 2.0, r - 1))
    t95 = float(_sps().t.ppf(0.975, r - 1))
    half = t95 * sd / math.sqrt(r)
    if test == "t":
        p = 1.0 if sd == 0 and mean == 0 else (0.0 if sd == 0 else float(_sps().ttest_1samp(logs, 0.0).pvalue))
    else:
        p = 1.0 if np.all(logs == 0) else float(_sps().wilcoxon(logs, alternative="two-sided").pvalue)
    detectable = math.expm1(t_crit * sd / math.sqrt(r))
    return PairedResult(r, math.exp(mean), math.exp(mean - half), math.exp(mean + half), p, detectable, sd)


def wilcoxon_min_p(rounds: int) -> float:
    """The smallest two-sided p the exact signed-rank test can give with `rounds` pairs."""
    return min(1.0, 2.0 / 2**rounds) if rounds else 1.0


# -- deciding many cells at once (sparsebench ab) -----------------------------------------
# An A/B run measures every cell of a suite over R rounds: per cell R paired log ratios.
# Testing each cell on its own wastes what the others say about the machine's noise (a
# t-test with R - 1 = 3 degrees of freedom needs t > 3.18), and testing 16 cells each at
# alpha fails a whole A/A run far more often than alpha. So:
# - each cell's variance is moderated towards the suite's (empirical Bayes, Smyth 2004: the
#   cells' variances are taken as draws from a scaled inverse chi-square whose degrees of
#   freedom d0 and scale s0^2 are estimated from them); the cell's test then has d0' + R - 1
#   degrees of freedom with d0' = PRIOR_DF_SHARE x d0, capped at the pooled degrees of
#   freedom of all cells. The share: with 10-30 cells the estimate of d0 runs high, and in
#   simulation (tests/test_gate_stats.py) the full d0 let whole A/A runs fail 7-9% of the
#   time at alpha 0.05 where half of it kept them at or under 5%;
# - the cells' p-values are Holm-adjusted, so a whole A/A run flags some cell with
#   probability at most alpha;
# - the suite itself is tested on the per-round geometric mean of all cells' ratios (a
#   uniform 3-5% slowdown of every cell is the commonest regression, and averaging the
#   cells shrinks the noise), with R - 1 degrees of freedom, which keeps whatever drift the
#   cells of one round share in its variance;
# - the change each test detects with 80% power at its level is reported both ways
#   (a slowdown bound and a speed-up bound, which differ on the ratio scale).
DETECT_POWER = 0.8
PRIOR_DF_SHARE = 0.5


def trigamma_inverse(x: float) -> float:
    """y with polygamma(1, y) = x (Newton's method from limma's trigammaInverse)."""
    from scipy.special import polygamma

    if x > 1e7:
        return 1.0 / math.sqrt(x)
    if x < 1e-6:
        return 1.0 / x
    y = 0.5 + 1.0 / x
    for _ in range(60):
        tri = float(polygamma(1, y))
        step = tri * (1.0 - tri / x) / float(polygamma(2, y))
        y += step
        if -step / y < 1e-8:
            break
    return y


def variance_prior(variances: Sequence[float], dfs: Sequence[float]) -> tuple[float, float]:
    """(d0, s0^2): the prior degrees of freedom and variance of Smyth's moderated t, from
    the cells' sample variances and their degrees of freedom. d0 is inf when the cells'
    variances vary no more than sampling alone would make them (then they share one)."""
    from scipy.special import digamma, polygamma

    s2 = np.maximum(np.asarray(variances, dtype=np.float64), 1e-12)  # a cell that did not vary at all
    d = np.asarray(dfs, dtype=np.float64)
    e = np.log(s2) - digamma(d / 2.0) + np.log(d / 2.0)
    mean_e = float(np.mean(e))
    if len(s2) < 3:
        return 0.0, float(np.exp(mean_e))  # too few cells to learn a prior: each cell alone
    spread = float(np.var(e, ddof=1) - np.mean(polygamma(1, d / 2.0)))
    if spread <= 0:
        return math.inf, float(np.exp(mean_e))
    d0 = 2.0 * trigamma_inverse(spread)
    return d0, float(np.exp(mean_e + digamma(d0 / 2.0) - math.log(d0 / 2.0)))


@dataclass
class CellChange:
    """One cell's change B/A over its paired rounds, tested with the moderated variance."""

    rounds: int
    ratio: float  # geometric mean of the per-round ratios
    ratio_low: float  # interval at the chosen alpha (1 - alpha confidence)
    ratio_high: float
    p_value: float  # the cell's own (moderated) p
    p_adjusted: float  # Holm-adjusted over the suite's cells
    df: float
    detect_slowdown: float  # the slowdown (negative fraction) detected with 80% power at the adjusted level
    detect_speedup: float  # the speed-up (positive fraction) likewise
    log_se: float = 0.0  # standard error of the mean log ratio (moderated)


def _t_quantile(q: float, df: float) -> float:
    """Student's t quantile (scipy.special.stdtrit: the same number as scipy.stats.t.ppf,
    without its per-call overhead, which dominated `ab`'s decision and its simulation)."""
    from scipy.special import stdtrit

    return float(stdtrit(df, q)) if math.isfinite(df) else float(_sps().norm.ppf(q))


def _t_two_sided_p(t: float, df: float) -> float:
    from scipy.special import stdtr

    return float(2.0 * stdtr(df, -abs(t))) if math.isfinite(df) else float(2.0 * _sps().norm.sf(abs(t)))


def _t_bounds(mean: float, se: float, df: float, alpha: float) -> tuple[float, float]:
    half = _t_quantile(1.0 - alpha / 2.0, df) * se
    return math.exp(mean - half), math.exp(mean + half)


def _detectable(se: float, df: float, level: float, power: float = DETECT_POWER) -> tuple[float, float]:
    """(slowdown, speed-up) a two-sided test at `level` detects with `power`."""
    delta = (_t_quantile(1.0 - level / 2.0, df) + _t_quantile(power, df)) * se
    return math.expm1(-delta), math.expm1(delta)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment: adjusted p <= alpha controls the family-wise error."""
    p = np.asarray(p_values, dtype=np.float64)
    m = len(p)
    order = np.argsort(p)
    adjusted = np.empty(m)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()


def moderated_cells(log_ratios: Sequence[Sequence[float]], alpha: float = 0.05) -> tuple[list[CellChange], float, float]:
    """Every cell's change from its per-round log ratios (each cell at least 2 rounds):
    (per cell, d0, s0^2). See the comment above for the method."""
    logs = [np.asarray(x, dtype=np.float64) for x in log_ratios]
    if any(len(x) < 2 for x in logs):
        raise ValueError("every cell needs at least 2 paired rounds")
    dfs = [len(x) - 1 for x in logs]
    variances = [float(np.var(x, ddof=1)) for x in logs]
    d0, s0 = variance_prior(variances, dfs)
    d0 = min(PRIOR_DF_SHARE * d0, float(sum(dfs)))  # never more certain than pooling every cell
    raw = []
    for x, d, s2 in zip(logs, dfs, variances):
        df = d0 + d
        var = (d0 * s0 + d * s2) / df
        se = math.sqrt(var / len(x)) if var > 0 else 0.0
        mean = float(np.mean(x))
        p = (0.0 if mean != 0 else 1.0) if se == 0 else _t_two_sided_p(abs(mean) / se, df)
        raw.append((x, df, se, mean, p))
    adjusted = holm([r[4] for r in raw])
    m = len(raw)
    cells = []
    for (x, df, se, mean, p), p_adj in zip(raw, adjusted):
        low, high = _t_bounds(mean, se, df, alpha) if se > 0 else (math.exp(mean), math.exp(mean))
        slow, fast = _detectable(se, df, alpha / m) if se > 0 else (0.0, 0.0)
        cells.append(CellChange(len(x), math.exp(mean), low, high, p, p_adj, df, slow, fast, se))
    return cells, d0, s0


@dataclass
class SuiteChange:
    """The suite's change: the geometric mean over cells of B/A, tested over the rounds."""

    rounds: int
    cells: int
    ratio: float
    ratio_low: float
    ratio_high: float
    p_value: float
    detect_slowdown: float
    detect_speedup: float
    round_sd: float  # standard deviation of the per-round mean log ratio


def suite_change(log_ratios: Sequence[Sequence[float]], alpha: float = 0.01) -> SuiteChange:
    """A paired t-test over rounds of the mean log ratio of all cells (cells x rounds, every
    cell measured in every round: pass only the rounds all cells share)."""
    table = np.asarray(log_ratios, dtype=np.float64)
    cells, rounds = table.shape
    per_round = table.mean(axis=0)
    mean = float(per_round.mean())
    sd = float(per_round.std(ddof=1)) if rounds > 1 else float("nan")
    if rounds < 2 or not math.isfinite(sd):
        return SuiteChange(rounds, cells, math.exp(mean), float("nan"), float("nan"), float("nan"), float("nan"),
                           float("nan"), sd)
    se = sd / math.sqrt(rounds)
    if se == 0:
        p = 0.0 if mean != 0 else 1.0
        return SuiteChange(rounds, cells, math.exp(mean), math.exp(mean), math.exp(mean), p, 0.0, 0.0, sd)
    p = _t_two_sided_p(abs(mean) / se, rounds - 1)
    low, high = _t_bounds(mean, se, rounds - 1, alpha)
    slow, fast = _detectable(se, rounds - 1, alpha)
    return SuiteChange(rounds, cells, math.exp(mean), low, high, p, slow, fast, sd)


def variance_components(a: Sequence[float], b: Sequence[float], windows: Sequence[Sequence[float]] = ()) \
        -> dict[str, float | None]:
    """Where one cell's noise comes from, in an A/A run (as standard deviations of logs,
    which read as CVs). The model: log rate of side s in round r = mean_s + round_r +
    process_sr, with round_r shared by both sides of a round (the machine's drift) and
    process_sr each process's own luck; within a process, its windows spread by `within`.
    Then var(log b - log a) = 2 var(process) and var of the round's mean of the two logs =
    var(round) + var(process) / 2. `windows`: every process's windows (either side)."""
    la, lb = np.log(np.asarray(a, dtype=np.float64)), np.log(np.asarray(b, dtype=np.float64))
    if len(la) < 2:
        return {"within": None, "between_process": None, "between_round": None}
    process_var = float(np.var(lb - la, ddof=1)) / 2.0
    round_var = float(np.var((la + lb) / 2.0, ddof=1)) - process_var / 2.0
    within = [float(np.std(np.log(np.asarray(w, dtype=np.float64)), ddof=1)) for w in windows if len(w) > 1]
    return {"within": float(math.sqrt(np.mean(np.square(within)))) if within else None,
            "between_process": math.sqrt(process_var),
            "between_round": math.sqrt(max(round_var, 0.0))}


# -- a slow mode one side alone has (sparsebench ab) --------------------------------------
# A regression that hits some processes only (a table copied in 1 process of 4, a memory
# layout that is slow when earlier cells left the heap fragmented) splits B's rounds into a
# normal and a slow mode. The mean log ratio then moves less than the slow rounds do, and
# the spread it adds weakens the cell's t-test. So each side's processes are also counted:
# a process is slow when its rate is below side A's median by more than `floor` (20%: far
# beyond a round's drift, 3% here). B having more slow processes than A is tested with
# Fisher's exact test (the hypergeometric tail, one-sided): conditional on how many slow
# processes there were in all, it is exact whatever made them slow, as long as it hits
# both sides alike: heavy tails, slow episodes of the machine, a slow mode both sides
# have. Its power is bounded by the rounds: with 8 per side, B slow in 6 of 8 and A in
# none gives p = 0.0035, B in 4 of 8 only 0.038 (no test can tell a mode in half of B's
# processes from one in a quarter of both sides' with A lucky, in 8 rounds).


@dataclass
class SlowMode:
    """Each side's slow processes, and the test of B having more."""

    rounds: int
    slow_a: list[int]  # 1-based rounds whose A process was slow
    slow_b: list[int]
    p_value: float  # Fisher's exact test, one-sided: B has more slow processes than A
    flagged: bool


def fisher_greater(slow_b: int, n_b: int, slow_a: int, n_a: int) -> float:
    """P(B has at least `slow_b` of the slow processes) when the slow_a + slow_b slow
    ones fell on the two sides at random (the hypergeometric tail)."""
    total, slow = n_a + n_b, slow_a + slow_b
    ways = math.comb(total, slow)
    return sum(math.comb(n_b, j) * math.comb(n_a, slow - j) for j in range(slow_b, min(slow, n_b) + 1)) / ways


def slow_mode(a_logs: Sequence[float], b_logs: Sequence[float], floor: float = 0.2, alpha: float = 0.005,
              rounds: Sequence[int] | None = None) -> SlowMode:
    """One cell's slow processes on each side (log rates, paired by round) and whether B
    has more than A at `alpha` (at least 2 of them)."""
    a, b = np.asarray(a_logs, dtype=np.float64), np.asarray(b_logs, dtype=np.float64)
    names = list(rounds) if rounds is not None else list(range(1, len(a) + 1))
    cut = float(np.median(a)) + math.log1p(-floor)
    slow_a = [names[i] for i, x in enumerate(a) if x < cut]
    slow_b = [names[i] for i, x in enumerate(b) if x < cut]
    p = fisher_greater(len(slow_b), len(b), len(slow_a), len(a)) if slow_b else 1.0
    return SlowMode(len(a), slow_a, slow_b, p, len(slow_b) >= 2 and p < alpha)
