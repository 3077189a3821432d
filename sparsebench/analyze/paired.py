"""Deciding an interleaved A/B run: every cell's paired rounds, and the suite as a whole.

Each round measured every cell once on side A and once on side B, close together in
time, so the ratio B/A of one round is free of the drift between rounds. Over R rounds a
cell has R paired log ratios. The decision uses all cells together (`stats`, "deciding
many cells at once"):

- per cell, a t-test of the mean log ratio whose variance is moderated towards the
  suite's (more degrees of freedom than the cell's own R - 1), Holm-adjusted over the
  cells so a whole A/A run flags some cell at most `alpha` of the time; a cell regresses
  when its adjusted p < alpha and it slowed by more than `max_regression`;
- the suite: the per-round geometric mean of all cells' ratios, tested over the rounds at
  `suite_alpha`; it regresses when significant and slower by more than
  `max_suite_regression` (a uniform few-percent slowdown of every cell is the commonest
  regression, and no single cell's test can see it);
- what each test can see: the slowdown and the speed-up it detects with 80% power at its
  level (`detect_slowdown`, `detect_speedup`), per cell and for the suite: the noise
  floor an A/A run reports.

A metric is wall time (`samples/s`, the default) or CPU time (`samples/CPU-s`); `ab`
decides both, each with its own floors. Cells pair by their place in the suite's
expansion, which both sides share when they run the same suite file; a side whose
settings change a cell's id (say `--b-set intra_op_threads=1`) still pairs cell for cell.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import UserError
from ..load import BUSY_CORES, record_busy
from ..record import Record, round_cpu_rate, round_rate
from ..results import Results
from ..stats import (PAIRED_TESTS, CellChange, SlowMode, SuiteChange, holm, moderated_cells, slow_mode, suite_change,
                     variance_components, wilcoxon_min_p)
from .difference import CellDifference, DifferenceReport, SuiteDifference, verdict

# What a metric reads from one round's record, and how a table names its unit.
METRICS: dict[str, tuple[Callable[[Record], float | None], str]] = {
    "wall": (round_rate, "samples/s"),
    "cpu": (round_cpu_rate, "samples/CPU-s"),
}


def _rounds(results: Results) -> list[tuple[str, dict[int, Record]]]:
    """(cell id, round -> record) in expansion order."""
    return list(results.by_round().items())


@dataclass(frozen=True)
class PairedRule:
    """How an interleaved A/B run is decided (the options of `ab`), in one value: the
    simulation in tests/test_gate_stats.py decides with exactly what `ab` decides with."""

    max_regression: float = 0.05  # a cell's change must be beyond this ...
    alpha: float = 0.05  # ... with its Holm-adjusted p below this
    test: str = "t"
    suite_alpha: float = 0.01
    max_suite_regression: float = 0.02
    mode_floor: float = 0.2  # a process slower than A's median by more than this is slow
    mode_alpha: float = 0.005  # B having more slow processes than A at this p (Fisher) flags the cell

    def check(self) -> None:
        """The options, checked before `ab` measures anything (a bad one would otherwise
        fail after minutes of rounds)."""
        for name, value in (("--max-regression", self.max_regression),
                            ("--max-suite-regression", self.max_suite_regression),
                            ("--mode-floor", self.mode_floor)):
            if not 0 < value < 1:
                raise UserError(f"{name}: must be between 0 and 100 percent, got {value * 100:g}")
        for name, value in (("--alpha", self.alpha), ("--suite-alpha", self.suite_alpha),
                            ("--mode-alpha", self.mode_alpha)):
            if not 0 < value < 1:
                raise UserError(f"{name}: must be between 0 and 1, got {value:g}")
        if self.test not in PAIRED_TESTS:
            raise UserError(f"--test: must be one of {', '.join(PAIRED_TESTS)}, got {self.test!r}")


@dataclass
class Decision:
    """Every testable cell's change, verdict and slow-mode check, and the suite's."""

    changes: list[CellChange]
    statuses: list[str]  # regressed | improved | unchanged, by the mean change (slow modes apart)
    modes: list[SlowMode]
    suite: SuiteChange | None
    suite_status: str | None

    def regressed(self, fail_on: str = "any") -> bool:
        """Whether this decision fails a gate (`fail_on` "suite": the suite only)."""
        if self.suite_status == "regressed":
            return True
        return fail_on == "any" and any(s == "regressed" or m.flagged for s, m in zip(self.statuses, self.modes))


def decide(rounds: list[list[int]], a_logs: list[np.ndarray], b_logs: list[np.ndarray], rule: PairedRule) -> Decision:
    """The decision over every testable cell at once, from each cell's paired rounds and
    each side's log rates in them: moderated variances of the log ratios B/A, Holm over
    the cells, the suite over the rounds all cells share, and each cell's slow-mode check."""
    logs = [np.asarray(b) - np.asarray(a) for a, b in zip(a_logs, b_logs)]
    changes, _, _ = moderated_cells(logs, rule.alpha)
    if rule.test == "wilcoxon":
        from scipy import stats as sps

        raw = [1.0 if np.all(x == 0) else float(sps.wilcoxon(x, alternative="two-sided").pvalue) for x in logs]
        changes = [c.__class__(**{**c.__dict__, "p_value": p, "p_adjusted": q}) for c, p, q in zip(changes, raw, holm(raw))]
    statuses = [verdict(c.ratio, c.p_adjusted, rule.max_regression, rule.alpha) for c in changes]
    modes = [slow_mode(a, b, rule.mode_floor, rule.mode_alpha, r) for r, a, b in zip(rounds, a_logs, b_logs)]
    shared = sorted(set.intersection(*(set(r) for r in rounds))) if rounds else []
    suite = suite_status = None
    if len(shared) >= 2:
        suite = suite_change([[x[r.index(k)] for k in shared] for r, x in zip(rounds, logs)], rule.suite_alpha)
        suite_status = verdict(suite.ratio, suite.p_value, rule.max_suite_regression, rule.suite_alpha)
    return Decision(changes, statuses, modes, suite, suite_status)


def check_options(*, max_regression: float, alpha: float, test: str, suite_alpha: float = 0.01,
                  max_suite_regression: float = 0.02, mode_floor: float = 0.2, mode_alpha: float = 0.005) -> None:
    PairedRule(max_regression, alpha, test, suite_alpha, max_suite_regression, mode_floor, mode_alpha).check()


def paired_report(a: Results, b: Results, *, max_regression: float = 0.05, alpha: float = 0.05, test: str = "t",
                  aa: bool = False, metric: str = "wall", suite_alpha: float = 0.01,
                  max_suite_regression: float = 0.02, mode_floor: float = 0.2,
                  mode_alpha: float = 0.005) -> DifferenceReport:
    rule = PairedRule(max_regression, alpha, test, suite_alpha, max_suite_regression, mode_floor, mode_alpha)
    rule.check()
    rate, unit = METRICS[metric]
    cells_a, cells_b = _rounds(a), _rounds(b)
    if len(cells_a) != len(cells_b):
        raise UserError(f"{a.path} holds {len(cells_a)} cells and {b.path} {len(cells_b)}: not two sides of one A/B run")
    test_name = ("moderated paired t-test on log ratios" if test == "t" else "Wilcoxon signed-rank test on log ratios")
    report = DifferenceReport(
        names=("A", "B"), max_regression=max_regression, alpha=alpha, metric=metric, unit=unit, confidence=1 - alpha,
        rule=(f"{metric} time: a cell regressed/improved when B's change is beyond {max_regression:.0%} and a "
              f"{test_name} over the rounds (variance moderated across cells, Holm-adjusted over them) gives "
              f"p < {alpha:g}; the suite when the geometric mean of all cells moved beyond "
              f"{max_suite_regression:.0%} with p < {suite_alpha:g} (paired t over rounds); a slow mode when more of B's "
              f"processes than A's ran slower than A's median by over {mode_floor:.0%} (at least 2; Fisher's exact "
              f"test, p < {mode_alpha:g}); a placement change when B's worker kept less than half of the "
              f"memory A's had in huge pages (A at least {HUGE_PAGES_MIN_MB:.0f} MiB)"))
    pending: list[tuple[int, list[int], np.ndarray, list[float], list[float], str]] = []
    for (id_a, rounds_a), (id_b, rounds_b) in zip(cells_a, cells_b):
        label = id_a if id_a == id_b else f"{id_a} vs {id_b}"
        diff, paired = _pair_cell(label, rounds_a, rounds_b, rate)
        report.cells.append(diff)
        if paired is not None:
            pending.append((len(report.cells) - 1, *paired))
    if pending:
        _apply(report, pending, decide([p[1] for p in pending], [np.log(p[3]) for p in pending],
                                       [np.log(p[4]) for p in pending], rule), rule)
    compared = [c for c in report.cells if c.status not in ("not compared", "failed")]
    rounds = max((c.samples[0] for c in compared), default=0)
    if test == "wilcoxon" and wilcoxon_min_p(rounds) * len(compared) > alpha:
        report.power_warnings.append(
            f"with {rounds} rounds and {len(compared)} cells the Holm-adjusted signed-rank test cannot reach "
            f"p < {alpha:g} (smallest possible p = {wilcoxon_min_p(rounds):.3g} per cell): no cell can be flagged by its "
            f"mean change; run more rounds or use --test t")
    blind = [c.cell_id for c in compared if c.detect_slowdown is not None and -c.detect_slowdown > max_regression]
    if blind:
        report.power_warnings.append(
            f"{len(blind)} of {len(compared)} cell(s) varied so much from round to round that even a slowdown beyond "
            f"{max_regression:.0%} would be missed more than 20% of the time (e.g. {blind[0]}); run more rounds")
    disturbed = _disturbed(cells_a, cells_b)
    if disturbed:
        report.power_warnings.append(
            f"{len(disturbed)} cell measurement(s) ran beside other load (other processes, the hypervisor or iowait took >= "
            f"{DISTURBED_CORES:g} core while it ran), e.g. {disturbed[0]}: a cell that keeps 1.5 cores busy "
            f"drops to one then, in wall time far more than in CPU time")
    if aa and compared:
        report.notes.append(_floor_note(compared, report.suite, alpha, rounds, metric))
        report.notes.append(_components_note(pending, cells_a, cells_b, metric))
    return report


DISTURBED_CORES = BUSY_CORES  # other processes, steal or iowait beyond this while a cell ran disturb it


def _disturbed(cells_a, cells_b) -> list[str]:
    """'cell (side X, round r: 0.9 other cores)' for every measurement beside other load."""
    found = []
    for side, cells in (("A", cells_a), ("B", cells_b)):
        for cell_id, rounds in cells:
            for r, record in sorted(rounds.items()):
                busy = record_busy(record)
                if busy:
                    found.append(f"{cell_id} (side {side}, round {r}: {busy})")
    return found


def _components_note(pending: list, cells_a, cells_b, metric: str) -> str:
    """The A/A run's variance components, median over the cells (`stats.variance_components`)."""
    windows_of = (lambda rec: rec.windows) if metric == "wall" else (lambda rec: rec.cpu_windows)
    parts: dict[str, list[float]] = {"within": [], "between_process": [], "between_round": []}
    for index, rounds, _, a, b, _ in pending:
        (_, rounds_a), (_, rounds_b) = cells_a[index], cells_b[index]
        windows = [windows_of(side[r]) or [] for side in (rounds_a, rounds_b) for r in rounds]
        for name, value in variance_components(a, b, windows).items():
            if value is not None:
                parts[name].append(value)
    text = ", ".join(f"{name.replace('_', '-')} {np.median(values):.1%}" for name, values in parts.items() if values)
    return (f"variance components, {metric} time (standard deviation of log rates, median over cells): {text} "
            f"(a window within its process; a process beyond its round; a round's drift, which pairing cancels)")


def _pair_cell(label: str, rounds_a: dict[int, Record], rounds_b: dict[int, Record], rate) \
        -> tuple[CellDifference, tuple | None]:
    """The cell's difference so far and, where it can be tested, (rounds, log ratios, A's
    rates, B's rates, note)."""
    def usable(record: Record) -> bool:
        return record.ok and (rate(record) or 0) > 0

    common = sorted(r for r in rounds_a if r in rounds_b and usable(rounds_a[r]) and usable(rounds_b[r]))
    missing = sorted((set(rounds_a) | set(rounds_b)) - set(common))
    # B crashed, timed out or skipped where A measured: a gate whose head fails a cell must fail,
    # whatever the rest says (a cell that stops being measured is no speed-up).
    crashed = sorted(r for r in rounds_b if rounds_b[r].status in ("failed", "timeout", "skipped")
                     and r in rounds_a and rounds_a[r].ok)
    if crashed:
        first = rounds_b[crashed[0]]
        a_rates = [rate(rounds_a[r]) for r in sorted(rounds_a) if usable(rounds_a[r])]
        return CellDifference(label, "failed", baseline=float(statistics.median(a_rates)) if a_rates else None,
                              unit="rounds", samples=(len(common), len(common)),
                              note=f"B {first.status} in round(s) {', '.join(map(str, crashed))} where A measured it "
                                   f"({first.reason})"), None
    if len(common) < 2:
        statuses = {str(rec.status) for rec in [*rounds_a.values(), *rounds_b.values()]}
        no_rate = any(rec.ok and not rate(rec) for rec in [*rounds_a.values(), *rounds_b.values()])
        why = "; no figure of this metric in the records (written before it existed?)" if no_rate else ""
        return CellDifference(label, "not compared", unit="rounds", samples=(len(common), len(common)),
                              note=f"{len(common)} round(s) measured on both sides ({', '.join(sorted(statuses))}){why}"), None
    a = [rate(rounds_a[r]) for r in common]
    b = [rate(rounds_b[r]) for r in common]
    logs = np.log(np.asarray(b) / np.asarray(a))
    note = f"rounds {', '.join(map(str, missing))} not paired" if missing else ""
    diff = CellDifference(label, "unchanged", float(statistics.median(a)), float(statistics.median(b)),
                          samples=(len(common), len(common)), unit="rounds", note=note,
                          huge_pages_mb=_huge_pages(rounds_a, rounds_b, common))
    return diff, (common, logs, a, b, note)


# A cell whose worker had at least this much memory in transparent huge pages on side A and
# less than half of it on side B lost them: its tables went back to 4 KB pages (README: the
# headline tier). A placement, measured, not timed: it does not move with the machine's load.
HUGE_PAGES_MIN_MB = 64.0
HUGE_PAGES_LOST = 0.5


def _huge_pages(rounds_a: dict[int, Record], rounds_b: dict[int, Record], common: list[int]) -> tuple | None:
    """(A's, B's) median huge-page-backed MiB over the paired rounds, where both recorded it."""
    a = [rounds_a[r].huge_pages_mb for r in common if rounds_a[r].huge_pages_mb is not None]
    b = [rounds_b[r].huge_pages_mb for r in common if rounds_b[r].huge_pages_mb is not None]
    return (float(statistics.median(a)), float(statistics.median(b))) if a and b else None


def lost_huge_pages(pair: tuple | None) -> bool:
    return pair is not None and pair[0] >= HUGE_PAGES_MIN_MB and pair[1] < HUGE_PAGES_LOST * pair[0]


def _apply(report: DifferenceReport, pending: list, decision: Decision, rule: PairedRule) -> None:
    """The decision into the report's cells and suite line."""
    for (index, *_), change, status, mode in zip(pending, decision.changes, decision.statuses, decision.modes):
        diff = report.cells[index]
        diff.ratio, diff.ratio_low, diff.ratio_high = change.ratio, change.ratio_low, change.ratio_high
        diff.p_value, diff.p_adjusted = change.p_value, change.p_adjusted
        diff.detect_slowdown, diff.detect_speedup = change.detect_slowdown, change.detect_speedup
        diff.detectable = -change.detect_slowdown
        diff.log_se = change.log_se
        diff.status = status
        if mode.flagged:
            diff.status, diff.slow_mode = "regressed", True
            said = (f"SLOW MODE: B slower than A's median by over {rule.mode_floor:.0%} in round(s) "
                    f"{', '.join(map(str, mode.slow_b))} of {mode.rounds}, A in "
                    f"{', '.join(map(str, mode.slow_a)) or 'none'} (Fisher p {mode.p_value:.2g})")
            diff.note = f"{said}; {diff.note}" if diff.note else said
        if lost_huge_pages(diff.huge_pages_mb):
            diff.status, diff.placement = "regressed", True
            said = (f"HUGE PAGES LOST: {diff.huge_pages_mb[0]:.0f} MiB of A's worker memory in huge pages, "
                    f"{diff.huge_pages_mb[1]:.0f} MiB of B's (median over rounds)")
            diff.note = f"{said}; {diff.note}" if diff.note else said
    suite = decision.suite
    if suite is not None:
        report.suite = SuiteDifference(decision.suite_status, suite.ratio, suite.ratio_low, suite.ratio_high,
                                       suite.p_value, suite.rounds, suite.cells, suite.detect_slowdown,
                                       suite.detect_speedup, rule.suite_alpha, rule.max_suite_regression,
                                       suite.round_sd / math.sqrt(suite.rounds) if suite.rounds else None)


def _floor_note(compared: list[CellDifference], suite: SuiteDifference | None, alpha: float, rounds: int,
                metric: str) -> str:
    slow = sorted(-c.detect_slowdown for c in compared if c.detect_slowdown is not None)
    text = (f"A/A run (both sides identical), {metric} time: with {rounds} rounds a cell's test detects, with 80% "
            f"power at its Holm-adjusted alpha {alpha:g}, a slowdown of {slow[len(slow) // 2]:.1%} for the median "
            f"cell and {slow[-1]:.1%} for the worst (best {slow[0]:.1%})")
    if suite is not None and suite.detect_slowdown is not None and math.isfinite(suite.detect_slowdown):
        text += (f"; the suite-level test detects a uniform slowdown of {-suite.detect_slowdown:.1%} "
                 f"(speed-up {suite.detect_speedup:+.1%}) at alpha {suite.alpha:g}")
    return text + "; any flagged cell here is a false alarm"
