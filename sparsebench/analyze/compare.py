"""`sparsebench compare`: a statistical throughput-regression gate between two stored runs.

Two runs made minutes apart on a shared machine differ in two ways that nothing in them
can tell from a change of the code:

1. A shift shared by every cell (the machine got slower or faster: load beside it, clock
   frequency). The report estimates it as the median change of all compared cells and
   judges it as one finding: `regressed` (the whole run) only beyond `max_shift`. A
   uniform change of the code smaller than that cannot be told from the machine here:
   `sparsebench ab`, which measures both sides alternately, can.
2. Each cell's own luck. Measured in several processes (`--processes N`), a cell's
   processes are the unit: their medians (corrected for the shared shift) are compared
   with a Welch t-test on logs, and the change must exceed `max_regression`. Measured in
   one process, only that process's windows exist; they say nothing of how much a second
   process would differ, and on a shared 2-core VM some cells are bimodal between
   processes (one cell ran at 60k, 108k, 80k, 62k, 103k and 61k samples/s in six quiet
   runs). So such a cell is flagged only when it changed by more than `noise_factor`
   beyond the shift (halved or doubled, by default), and the report names each such run.

A cell regresses when its change beyond the shared shift is past its factor AND its test
is significant at `alpha` (asv's rule: a factor and significance); improvements mirror it.
Higher is better. `difference_report` is pure data; `difference.render_*` format it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import UserError
from ..machine import environment_differences
from ..record import Record, cell_rate, usable_windows
from ..results import Results
from ..stats import mann_whitney_min_p, mann_whitney_p, ratio_interval, welch_log_p
from .difference import CellDifference, DifferenceReport, verdict

# Defaults measured on the 2-core development VM (README, "Comparing runs in CI"): five
# quiet back-to-back A/A pairs of the 23-cell smoke run shifted by -4.3% to +9.5%, a run
# beside two busy processes by -32%; single cells of the quiet pairs moved by up to 1.78x
# beyond the shift.
STORED_MAX_SHIFT = 0.20  # the shared shift that counts as a regression of the whole run
STORED_NOISE_FACTOR = 2.0  # a one-process cell must halve or double (beyond the shift) to be flagged
MIN_CELLS_FOR_SHIFT = 3


def _threads(record: Record) -> tuple | None:
    effect = record.threads_in_effect
    if not effect:
        return None
    return tuple(effect.get(k) for k in ("intra_op_threads_resolved", "inter_op_threads_resolved",
                                         "omp_num_threads", "mkl_num_threads", "tf_enable_onednn_opts"))


def metrics_in(baseline: Results, current: Results) -> list[str]:
    """wall, and cpu where both runs recorded CPU time (records from before it did not)."""
    both = all(any(r.cpu_windows for r in run.records) for run in (baseline, current))
    return ["wall", "cpu"] if both else ["wall"]


def difference_report(baseline: Results, current: Results, *, max_regression: float = 0.10, alpha: float = 0.01,
                      noise_factor: float = STORED_NOISE_FACTOR, max_shift: float = STORED_MAX_SHIFT,
                      metric: str = "wall") -> DifferenceReport:
    for name, value in (("--max-regression", max_regression), ("--max-shift", max_shift)):
        if not 0 < value < 1:
            raise UserError(f"{name}: must be between 0 and 100 percent, got {value * 100:g}")
    if not noise_factor > 1:
        raise UserError(f"--noise-factor: must be above 1 (2 = a cell must halve or double), got {noise_factor:g}")
    if not 0 < alpha < 1:
        raise UserError(f"--alpha: must be between 0 and 1, got {alpha:g}")
    base = {r.cell_id: r for r in baseline.latest()}
    cur = {r.cell_id: r for r in current.latest()}
    common = [cid for cid in base if cid in cur]
    if not common:
        raise UserError(f"{baseline.path} and {current.path} have no cell in common (different suites or settings?)")
    report = DifferenceReport(
        max_regression=max_regression, alpha=alpha, metric=metric, unit=UNITS[metric],
        rule=(f"{metric} time: regressed/improved: a cell's change beyond the shared shift exceeds {max_regression:.0%} "
              f"(and {noise_factor:g}x either way for a cell measured in one process) and p < {alpha:g} (Welch t-test on the "
              f"processes' medians, or Mann-Whitney U on one process's windows); the shared shift itself "
              f"counts as a regression of the whole run beyond {max_shift:.0%}"))
    report.only_in_baseline = [cid for cid in base if cid not in cur]
    report.only_in_current = [cid for cid in cur if cid not in base]
    report.environment_warnings = environment_differences(baseline.environment, current.environment)
    thread_changes = [cid for cid in common if _threads(base[cid]) and _threads(cur[cid])
                      and _threads(base[cid]) != _threads(cur[cid])]
    if thread_changes:
        report.environment_warnings.append(
            f"thread settings in effect differ for {len(thread_changes)} cell(s), e.g. {thread_changes[0]}")
    for name, run, records in (("baseline", baseline, base), ("current", current, cur)):
        single = [cid for cid in common if records[cid].ok and (records[cid].processes or 1) < 2]
        if single:
            report.notes.append(
                f"{name} {run.path} measured {len(single)} of {len(common)} cells in one process: run-to-run noise "
                f"unknown, so those cells are flagged only when they change {noise_factor:g}x beyond the shared shift "
                f"(--noise-factor); "
                f"measure with --processes N, or compare with `sparsebench ab`")
    groups = {cid: (_groups(base[cid], metric), _groups(cur[cid], metric)) for cid in common}
    logs = [math.log(_median(b) / _median(a)) for a, b in groups.values()
            if a and b and _median(a) > 0 and _median(b) > 0]
    shift = float(np.median(logs)) if len(logs) >= MIN_CELLS_FOR_SHIFT else 0.0
    underpowered = set()
    for cid in common:
        diff = _compare_cell(cid, base[cid], cur[cid], *groups[cid], shift, max_regression, alpha, noise_factor)
        report.cells.append(diff)
        if diff.status not in ("not compared", "failed") and diff.unit == "windows" \
                and mann_whitney_min_p(*diff.samples) > alpha:
            underpowered.add(diff.samples)
    for n, m in sorted(underpowered):
        report.power_warnings.append(
            f"with {n} and {m} windows the U test cannot reach p < {alpha:g} (smallest possible p = "
            f"{mann_whitney_min_p(n, m):.3g}): such cells can never be flagged; measure more windows")
    if len(logs) >= MIN_CELLS_FOR_SHIFT:
        report.shift = math.expm1(shift)
        status = verdict(math.exp(shift), 0.0, max_shift, alpha)
        report.shift_status = status
        report.notes.append(
            f"shared shift: every compared cell together moved by a median {math.expm1(shift):+.1%}; "
            + (f"beyond {max_shift:.0%}: the whole run {status.upper()} (or the machine did: `sparsebench ab` "
               f"tells the two apart)" if status != "unchanged" else
               f"within {max_shift:.0%}, taken as the machine's drift; each cell is judged beyond it"))
    return report


UNITS = {"wall": "samples/s", "cpu": "samples/CPU-s"}


def _groups(record: Record, metric: str = "wall") -> list[list[float]]:
    """A record's windows by process (one group for a one-process record), in wall time or
    in CPU time (a merged record holds each process's CPU windows)."""
    if not record.ok:
        return []
    if metric == "cpu":
        windows = record.cpu_windows or []
        groups = windows if windows and isinstance(windows[0], list) else [windows]
        return [usable for usable in (usable_windows(g) for g in groups) if usable]
    return [usable for usable in (usable_windows(g) for g in (record.process_windows or [record.windows or []]))
            if usable]


def _stores_windows(record: Record) -> bool:
    """The record holds windows, usable or not (a stalled or NaN window is stored as 0 or null)."""
    return any(record.process_windows or [record.windows or []])


def _median(groups: list[list[float]]) -> float:
    """The cell rate, recomputed from the stored windows (both runs alike)."""
    return cell_rate(groups)


def _compare_cell(cid: str, base: Record, cur: Record, groups_a: list, groups_b: list, shift: float,
                  max_regression: float, alpha: float, noise_factor: float) -> CellDifference:
    if base.ok and not _crashed(base) and _crashed(cur):
        return CellDifference(cid, "failed", baseline=_median(groups_a) if groups_a else None,
                              note=f"current {_failure(cur)}; the baseline measured it")
    if not base.ok or not cur.ok:
        return CellDifference(cid, "not compared", note=f"baseline {_status(base)}, current {_status(cur)}")
    if not groups_a or not groups_b:
        stored = all(_stores_windows(r) for r, g in ((base, groups_a), (cur, groups_b)) if not g)
        return CellDifference(cid, "not compared", note="no usable median (its windows are zero, NaN or infinite)"
                              if stored else "no windows stored")
    median_a, median_b = _median(groups_a), _median(groups_b)
    ratio = median_b / median_a if median_a > 0 else float("nan")
    if not math.isfinite(ratio) or ratio <= 0:
        return CellDifference(cid, "not compared", note="no usable median (zero, NaN or infinite windows)")
    low, high = ratio_interval(groups_a, groups_b)
    own = ratio / math.exp(shift)  # the change beyond what every cell did
    note = f"{own - 1.0:+.1%} beyond the shared shift" if shift else ""
    if len(groups_a) >= 2 and len(groups_b) >= 2:
        p = welch_log_p([np.median(g) for g in groups_a], [np.median(g) * math.exp(-shift) for g in groups_b])
        return CellDifference(cid, verdict(own, p, max_regression, alpha), median_a, median_b, ratio, low, high, p,
                              (len(groups_a), len(groups_b)), "processes", note=note)
    a, b = np.concatenate(groups_a), np.concatenate(groups_b) * math.exp(-shift)
    p = mann_whitney_p(a, b)
    note = "; ".join(x for x in (note, "one process: run-to-run noise unknown") if x)
    return CellDifference(cid, verdict(own, p, max_regression, alpha, noise_factor), median_a, median_b, ratio, low,
                          high, p, (len(a), len(b)), "windows", note=note)


def _crashed(record: Record) -> bool:
    """Some process of the cell failed or timed out (a merged record stays ok when another
    process was)."""
    return record.status in ("failed", "timeout") or bool(record.failed_rounds)


def _failure(record: Record) -> str:
    if not record.ok:
        return _status(record)
    rounds = record.failed_rounds or []
    first = rounds[0]
    return (f"{len(rounds)} of {len(rounds) + (record.processes or 0)} processes not ok (round {first.get('round')}: "
            f"{first.get('status')}, {first.get('reason')})")


def _status(record: Record) -> str:
    return f"{record.status} ({record.reason})" if record.reason else str(record.status)
