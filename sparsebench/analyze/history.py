"""`sparsebench history`: each cell's throughput across commits, and the steps in it.

A nightly job stores one results file per commit; this module places every file on its
commit (the header's `run.git`, written by `run`), orders the commits by their commit time
(the run's start time where a file has no commit), and gives each cell a trend: at each
commit the median of its windows with the hierarchical 95% interval (the files of one
commit are its processes).

Steps are found in two stages, because a change-point search alone always finds
something in noise:

1. candidates: `ruptures`' PELT search on the log of the per-commit rates, its penalty
   the BIC-like `2 sigma^2 log n`, sigma estimated from the series itself (the median
   absolute difference of neighbours, which a step barely moves);
2. confirmation: the commits between each candidate's neighbouring candidates are tested
   for any step at all, their largest split statistic against that of step-free series of
   the same length (`step_p`: the search for the best split is paid for in the p value),
   Holm-corrected over the cell's candidates; a step is kept when its p is below alpha and
   its size at least `min_step`, its interval Welch's between the two levels.

The unit is the commit, not the window: windows of one run share that run's luck, so
only commits are independent samples of the run-to-run noise the step must rise above.
A step therefore needs at least `MIN_SEGMENT` commits on each side: a slow-down shows up
once the second nightly run after it is stored.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import math
import re
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import stats as sps

from .. import stats
from ..errors import UserError
from ..load import BUSY_CORES, record_busy
from ..record import usable_windows
from ..results import Results, ResultsError, read_results

MIN_SEGMENT = 2  # commits on each side of a step
DEFAULT_ALPHA = 0.01
DEFAULT_MIN_STEP = 0.03


@dataclass
class Placement:
    """Where one results file sits on the history."""

    path: Path
    commit: str | None
    dirty: bool | None
    when: datetime  # the commit's time, else the run's start
    when_source: str  # "commit" or "run"
    started_at: datetime | None

    @property
    def key(self) -> str:
        return self.commit or f"run {self.path.name}"


@dataclass
class Point:
    """One cell at one commit: its windows from every file of that commit."""

    position: int
    commit: str | None
    when: datetime
    files: list[str]
    rate: float
    low: float
    high: float
    groups: list[list[float]]  # windows per process (per file and round)
    busy: list[str] = field(default_factory=list)  # what else ran, for each of its processes measured busy

    @property
    def processes(self) -> int:
        return len(self.groups)


@dataclass
class Step:
    """A level change between two runs of commits."""

    before: str | None  # the last commit on the old level
    after: str | None  # the first commit on the new level
    position: int  # index of `after` among the cell's points
    ratio: float  # new level over old level (geometric means of the per-commit rates)
    low: float
    high: float
    p: float
    commits_before: int
    commits_after: int

    def range_text(self) -> str:
        return f"{short_commit(self.before)}..{short_commit(self.after)}"


@dataclass
class Trend:
    cell_id: str
    label: str
    points: list[Point]
    steps: list[Step] = field(default_factory=list)
    candidates: int = 0


@dataclass
class History:
    placements: list[Placement]
    trends: list[Trend]
    alpha: float
    min_step: float
    warnings: list[str] = field(default_factory=list)

    @property
    def commits(self) -> list[str]:
        seen: list[str] = []
        for p in self.placements:
            if p.key not in seen:
                seen.append(p.key)
        return seen


def short_commit(commit: str | None) -> str:
    if commit is None:
        return "?"
    return commit[:9] if not commit.startswith("run ") else commit


# -- reading and placing ---------------------------------------------------------------
def results_paths(paths: Sequence[Path]) -> list[Path]:
    """Files as given; a folder gives its *.jsonl files, searched recursively."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*.jsonl") if p.is_file())
        else:
            found.append(path)
    if not found:
        raise UserError(f"history: no results files (*.jsonl) in {', '.join(map(str, paths))}")
    return found


def _parse_time(text: Any) -> datetime | None:
    if not isinstance(text, str) or not text:
        return None
    for form in (None, "%Y-%m-%dT%H:%M:%S%z"):
        try:
            value = datetime.fromisoformat(text) if form is None else datetime.strptime(text, form)
        except ValueError:
            continue
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return None


COMMIT_ID = re.compile(r"[0-9a-fA-F]{4,64}")  # an abbreviated or full object name, as `run` records it


def _commit_time(commit: str, repo: Path | None) -> datetime | None:
    """A commit's time from a git checkout (results written by a sparsebench that did not
    record it). `commit` is a checked object name (`place`), and git is told that no
    option follows: a header's "--output=FILE" made git write FILE."""
    if repo is None:
        return None
    try:
        done = subprocess.run(["git", "show", "-s", "--format=%cI", "--end-of-options", commit], cwd=repo,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return _parse_time(done.stdout.strip()) if done.returncode == 0 else None


def place(results: Results, repo: Path | None) -> Placement:
    run = results.header.get("run") or {}
    git = run.get("git") if isinstance(run.get("git"), dict) else {}
    commit = git.get("commit") if isinstance(git.get("commit"), str) and git.get("commit") else None
    if commit is not None and not COMMIT_ID.fullmatch(commit):
        raise ResultsError(f"{results.path}: the header's run.git.commit {commit[:60]!r} is not a commit id "
                           f"(4 to 64 hex digits)")
    started = _parse_time(run.get("started_at"))
    when = _parse_time(git.get("committed_at"))
    if when is None and commit is not None:
        when = _commit_time(commit, repo)
    source = "commit"
    if when is None:
        if started is None:
            raise ResultsError(f"{results.path}: the header has neither a commit time nor a start time; "
                               f"history cannot place it")
        when, source = started, "run"
    return Placement(results.path, commit, git.get("dirty"), when, source, started)


def _matches(patterns: Sequence[str], cell_id: str, label: str) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(cell_id, p) or fnmatch.fnmatchcase(label, p) for p in patterns)


def _since_filter(placed: list[tuple[Placement, Results]], since: str | None) -> list[tuple[Placement, Results]]:
    """`--since`: a date (YYYY-MM-DD or ISO time) or a commit (a prefix of at least 4 digits)."""
    if not since:
        return placed
    moment = _parse_time(since)
    if moment is not None:
        return [(p, r) for p, r in placed if p.when >= moment]
    matching = [p for p, _ in placed if p.commit and len(since) >= 4 and p.commit.startswith(since.lower())]
    if not matching:
        raise UserError(f"history --since {since}: neither a date (YYYY-MM-DD) nor the commit of any results file")
    start = min(p.when for p in matching)
    return [(p, r) for p, r in placed if p.when >= start]


def load_history(paths: Sequence[Path], *, cells: Sequence[str] = (), since: str | None = None,
                 repo: Path | None = None, alpha: float = DEFAULT_ALPHA,
                 min_step: float = DEFAULT_MIN_STEP, skip_busy: bool = False) -> History:
    if not 0 < alpha < 1:
        raise UserError(f"history --alpha {alpha}: must be between 0 and 1")
    if not 0 <= min_step < 1:
        raise UserError(f"history --min-step {min_step * 100:g}: must be at least 0 and below 100 (percent)")
    warnings: list[str] = []
    placed = []
    seen: dict[str, Path] = {}  # content digest -> the first file with that content
    for path in results_paths(paths):
        copy_of = _copy_of(path, seen)
        if copy_of is not None:  # as a second process of its commit it would narrow the interval
            warnings.append(f"{path}: a byte-identical copy of {copy_of}; left out (one run counts once)")
            continue
        results = read_results(path)
        warnings += results.warnings
        side = results.header.get("ab")
        if isinstance(side, dict):
            warnings.append(f"{path}: side {side.get('side', '?')} of a `sparsebench ab` run; left out (an A/B "
                            f"pair is one comparison, not a commit's history: `compare` or `ab` reads it)")
            continue
        placement = place(results, repo)
        if placement.commit is None:
            warnings.append(f"{path}: no commit in its header; placed at its run's start time")
        if placement.dirty:
            warnings.append(f"{path}: measured on a checkout with uncommitted changes to {short_commit(placement.commit)}")
        placed.append((placement, results))
    if not placed:
        raise UserError(f"history: no results file left to place ({'; '.join(warnings[-3:])})")
    placed = _since_filter(placed, since)
    if not placed:
        raise UserError(f"history --since {since}: no results file is that recent")
    placed.sort(key=lambda pr: (pr[0].when, pr[0].started_at or pr[0].when, str(pr[0].path)))
    skipped: list[str] = []
    unusable: list[str] = []
    trends = _trends(placed, cells, skipped if skip_busy else None, unusable)
    if unusable:
        warnings.append(f"{len(unusable)} record(s) hold windows that are not rates above zero (null, as a NaN is "
                        f"stored, zero or infinite): those windows are left out, e.g. {unusable[0]}")
    if skipped:
        warnings.append(f"--skip-busy: left out {len(skipped)} measurement(s) taken on a busy machine, e.g. "
                        f"{skipped[0]}")
    if cells and not trends:
        raise UserError(f"history --cells {','.join(cells)}: matches no cell of the results files")
    for trend in trends:
        _find_steps(trend, alpha, min_step)
    busy = [(t.label, p) for t in trends for p in t.points if p.busy]
    if busy:
        label, point = busy[0]
        warnings.append(f"{len(busy)} of {sum(len(t.points) for t in trends)} cell measurements ran on a busy machine "
                        f"(other processes, steal or iowait of {BUSY_CORES:g} core or more), e.g. {label} at "
                        f"{short_commit(point.commit)} ({point.busy[0]}): their rates are likely low, and a step "
                        f"next to them may be the machine's")
    return History([p for p, _ in placed], trends, alpha, min_step, warnings)


def _copy_of(path: Path, seen: dict[str, Path]) -> Path | None:
    """The file read before with the same bytes as `path` (None: none; unreadable files are
    left for the reader to name)."""
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None
    if digest in seen:
        return seen[digest]
    seen[digest] = path
    return None


def _trends(placed: list[tuple[Placement, Results]], patterns: Sequence[str],
            skipped: list[str] | None = None, unusable: list[str] | None = None) -> list[Trend]:
    """Per cell, a point per commit. With `skipped` (a list), measurements taken on a busy
    machine are left out and named there instead. Windows that are no rate above zero are
    left out, each record holding some named in `unusable`."""
    order: list[str] = []
    positions: dict[str, list[tuple[Placement, Results]]] = {}
    for placement, results in placed:
        if placement.key not in positions:
            order.append(placement.key)
            positions[placement.key] = []
        positions[placement.key].append((placement, results))
    cells: dict[str, Trend] = {}
    for index, key in enumerate(order):
        per_cell: dict[str, tuple[str, list[list[float]], list[str], list[str]]] = {}
        for placement, results in positions[key]:
            for cell_id, rounds in results.by_round().items():
                for record in rounds.values():
                    if not record.ok or not record.windows:
                        continue
                    label = cell_id.rsplit("-", 1)[0]  # the id is the label and a hash
                    if not _matches(patterns, cell_id, label):
                        continue
                    busy = record_busy(record)
                    if busy and skipped is not None:
                        skipped.append(f"{label} in {placement.path.name} ({busy})")
                        continue
                    windows = usable_windows(record.windows)
                    if len(windows) < len(record.windows) and unusable is not None:
                        unusable.append(f"{label} in {placement.path.name} ({len(record.windows) - len(windows)} of "
                                        f"{len(record.windows)} windows)")
                    if not windows:
                        continue
                    entry = per_cell.setdefault(cell_id, (label, [], [], []))
                    entry[1].append(windows)
                    if str(placement.path) not in entry[2]:
                        entry[2].append(str(placement.path))
                    if busy:
                        entry[3].append(f"{placement.path.name}: {busy}")
        first = positions[key][0][0]
        for cell_id, (label, groups, files, busy) in per_cell.items():
            pooled = np.concatenate([np.asarray(g) for g in groups])
            low, high = stats.hierarchical_median_interval(groups)
            trend = cells.setdefault(cell_id, Trend(cell_id, label, []))
            trend.points.append(Point(index, first.commit, first.when, files, float(np.median(pooled)), low, high,
                                      groups, busy))
    return list(cells.values())


# -- steps -----------------------------------------------------------------------------
def noise_sigma(values: np.ndarray) -> float:
    """The series' point-to-point noise (log scale), robust to a few steps: the median
    absolute difference of neighbours over 0.6745 * sqrt(2)."""
    if len(values) < 3:
        return float("nan")
    return float(np.median(np.abs(np.diff(values))) / (0.6745 * math.sqrt(2)))


def candidates(values: np.ndarray) -> list[int]:
    """Indices where a new level starts, by PELT (ruptures) with a BIC-like penalty."""
    import ruptures

    n = len(values)
    if n < 2 * MIN_SEGMENT:
        return []
    sigma = noise_sigma(values)
    if not math.isfinite(sigma) or sigma <= 0:
        sigma = max(float(np.std(values)), 1e-9)
    penalty = 2.0 * sigma ** 2 * math.log(n)
    ends = ruptures.Pelt(model="l2", min_size=MIN_SEGMENT, jump=1).fit(values.reshape(-1, 1)).predict(pen=penalty)
    return [e for e in ends if e < n]


SIMULATIONS = 20000


def split_statistics(series: np.ndarray) -> np.ndarray:
    """For each row of `series` (one ordering of a segment's values) and each split with at
    least MIN_SEGMENT values on both sides, the pooled two-sample t statistic's magnitude;
    the max over splits is the statistic a change-point search maximizes."""
    series = np.atleast_2d(series)
    m = series.shape[1]
    k = np.arange(MIN_SEGMENT, m - MIN_SEGMENT + 1)
    csum, csq = np.cumsum(series, axis=1), np.cumsum(series ** 2, axis=1)
    total, total_sq = csum[:, -1:], csq[:, -1:]
    left_sum, left_sq = csum[:, k - 1], csq[:, k - 1]
    right_sum, right_sq = total - left_sum, total_sq - left_sq
    left_mean, right_mean = left_sum / k, right_sum / (m - k)
    within = (left_sq - k * left_mean ** 2) + (right_sq - (m - k) * right_mean ** 2)
    pooled = np.sqrt(np.maximum(within, 0) / (m - 2))
    scale = np.sqrt(k * (m - k) / m)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.abs(left_mean - right_mean) * scale / pooled
    return np.nan_to_num(t, nan=0.0, posinf=np.finfo(float).max)


@functools.lru_cache(maxsize=256)
def _null_maxima(length: int) -> np.ndarray:
    """The largest split statistic of SIMULATIONS step-free Gaussian series of `length`
    values, sorted (the statistic is scale-free, so one unit-variance set serves every
    series). Seeded by the length: the same series always gets the same p."""
    rng = np.random.default_rng(length)
    return np.sort(split_statistics(rng.standard_normal((SIMULATIONS, length))).max(axis=1))


def step_p(segment: np.ndarray) -> float:
    """Is there any step in `segment`? Its largest split statistic against the largest
    split statistics of step-free series of the same length (Gaussian noise: the log of
    per-commit rates), so the search for the best split is paid for in the p value."""
    if len(segment) < 2 * MIN_SEGMENT:
        return 1.0
    observed = split_statistics(segment).max()
    null = _null_maxima(len(segment))
    exceed = len(null) - int(np.searchsorted(null, observed, side="left"))
    return (1 + exceed) / (1 + len(null))


def confirmed_steps(values: np.ndarray, alpha: float, min_step: float) -> tuple[list[int], int, list[tuple]]:
    """PELT's candidates, pruned backwards. Each candidate is tested on the commits between
    its neighbouring candidates by `step_p` (Holm-corrected over the candidates);
    while any fails alpha or min_step, the weakest is dropped and its neighbours are
    retested on the merged segments. Returns the kept positions, how many candidates PELT
    proposed, and each kept step's (log change, its Welch 95% interval, p)."""
    found = candidates(values)
    count = len(found)
    while found:
        bounds = [0, *found, len(values)]
        segments = [values[bounds[i]:bounds[i + 2]] for i in range(len(found))]
        changes = [level_change(values[bounds[i]:at], values[at:bounds[i + 2]]) for i, at in enumerate(found)]
        adjusted = stats.holm([step_p(seg) for seg in segments])
        failing = [i for i, (c, p) in enumerate(zip(changes, adjusted))
                   if not (p < alpha and abs(math.exp(c[0]) - 1) >= min_step)]
        if not failing:
            return found, count, [(*c, p) for c, p in zip(changes, adjusted)]
        weakest = max(failing, key=lambda i: (adjusted[i], -abs(changes[i][0])))
        found = found[:weakest] + found[weakest + 1:]
    return [], count, []


def _find_steps(trend: Trend, alpha: float, min_step: float) -> None:
    values = np.log(np.array([p.rate for p in trend.points]))
    found, trend.candidates, tests = confirmed_steps(values, alpha, min_step)
    bounds = [0, *found, len(values)]
    for i, (at, (diff, lo, hi, p)) in enumerate(zip(found, tests)):
        trend.steps.append(Step(trend.points[at - 1].commit, trend.points[at].commit, at, math.exp(diff),
                                math.exp(lo), math.exp(hi), p, at - bounds[i], bounds[i + 2] - at))


def level_change(before: np.ndarray, after: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """The difference of mean log rates and its Welch interval (the step's size; whether
    there is a step at all is `step_p`'s to say)."""
    diff = float(after.mean() - before.mean())
    va, vb = before.var(ddof=1) / len(before), after.var(ddof=1) / len(after)
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, diff, diff
    df = (va + vb) ** 2 / (va ** 2 / (len(before) - 1) + vb ** 2 / (len(after) - 1))
    half = float(sps.t.ppf(0.5 + confidence / 2, df)) * se
    return diff, diff - half, diff + half
