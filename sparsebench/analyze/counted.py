"""Deciding a counted A/B run (`sparsebench ab --count`): instructions and estimated
cycles per example, which do not move with the machine's load.

Counts from callgrind repeat to a few hundredths of a percent between processes (one
thread, a fixed hash seed), so no statistics are needed: a cell whose count per example
changed by more than `threshold` (1% by default) is a finding. To read like every other
table, both figures are shown as throughput, examples per 10^9 instructions (or estimated
cycles): higher is better, a negative change is a slowdown. Each cell also names the
functions whose own cost per example changed most, from callgrind's per-function counts,
so a flagged cell says where.

A cell's change is the median over its counted steps of step i on A against step i on B:
step i trains the same batch after the same history on both sides, while consecutive steps
of one side differ by their batch (10-15% at batch 32), so two sides' median steps can be
different steps. Records without step series (older ones) compare their median steps.
"""

from __future__ import annotations

import math

from ..errors import UserError
from ..record import Record
from ..results import Results
from .difference import CellDifference, DifferenceReport, SuiteDifference

COUNTED_METRICS = {
    "instructions": ("instructions_per_example", "examples/Ginstr", "Ir"),
    "cycles": ("cycles_per_example", "examples/Gcycle", "cycles"),
}
STEP_SERIES = {"instructions": "counted_step_instructions", "cycles": "counted_step_cycles"}
FUNCTIONS_NAMED = 3


def counted_report(a: Results, b: Results, *, metric: str = "instructions", threshold: float = 0.01,
                   gated: bool = True, gated_cells: tuple[str, ...] = ()) -> DifferenceReport:
    """`gated` False: the verdicts are shown but do not fail the run (estimated cycles by
    default: see `ab --cycles-threshold`); `gated_cells`: only the cells whose id or label
    matches one of these patterns are gated, the others shown."""
    if not 0 < threshold < 1:
        raise UserError(f"--count-threshold: must be between 0 and 100 percent, got {threshold * 100:g}")
    field, unit, event = COUNTED_METRICS[metric]
    cells_a, cells_b = list(a.by_round().items()), list(b.by_round().items())
    if len(cells_a) != len(cells_b):
        raise UserError(f"{a.path} holds {len(cells_a)} cells and {b.path} {len(cells_b)}: not two sides of one run")
    report = DifferenceReport(
        names=("A", "B"), max_regression=threshold, alpha=1.0, metric=metric, unit=unit, counted=True, gated=gated,
        rule=(f"counted {metric} (callgrind, one thread, deterministic): a cell regressed/improved when its "
              f"{metric} per example (its median step against the other side's same step, idle spinning left out) changed by more than {threshold:.1%}; the suite when the geometric mean did"
              + ("" if gated else " (shown only, not gated: see ab --cycles-threshold)")
              + (f"; gated only for cells matching {', '.join(gated_cells)}" if gated and gated_cells else "")))
    logs = []
    for (id_a, rounds_a), (id_b, rounds_b) in zip(cells_a, cells_b):
        label = id_a if id_a == id_b else f"{id_a} vs {id_b}"
        ra, rb = rounds_a[min(rounds_a)], rounds_b[min(rounds_b)]
        cost_a, cost_b = ra.get(field), rb.get(field)
        if rb.status in ("failed", "timeout", "skipped") and ra.ok:  # a cell B stopped counting fails
            report.cells.append(CellDifference(label, "failed", note=f"B {rb.status} ({rb.reason}) where A was counted"))
            continue
        if not (ra.ok and rb.ok and cost_a and cost_b):
            report.cells.append(CellDifference(label, "not compared", note=f"A {_status(ra)}, B {_status(rb)}"))
            continue
        ratio = paired_ratio(ra, rb, metric) or cost_a / cost_b  # examples per unit of work, B over A
        logs.append(math.log(ratio))
        status = "regressed" if ratio < 1 - threshold else "improved" if ratio > 1 + threshold else "unchanged"
        where = function_changes(ra, rb, event) if status != "unchanged" else ""  # a flagged cell says where
        report.cells.append(CellDifference(label, status, 1e9 / cost_a, 1e9 / cost_b, ratio, samples=(1, 1),
                                           unit="counted", note=where,
                                           gated=not gated_cells or _matches(gated_cells, id_b, rb)))
    if logs:
        ratio = math.exp(sum(logs) / len(logs))
        status = "regressed" if ratio < 1 - threshold else "improved" if ratio > 1 + threshold else "unchanged"
        report.suite = SuiteDifference(status, ratio, ratio, ratio, float("nan"), 1, len(logs), -threshold,
                                       threshold, 1.0, threshold)
    return report


def paired_ratio(a: Record, b: Record, metric: str) -> float | None:
    """The median over counted steps of A's cost over B's, step i against step i (None
    when the two records do not hold step series of equal length)."""
    steps_a, steps_b = a.get(STEP_SERIES[metric]) or [], b.get(STEP_SERIES[metric]) or []
    if not steps_a or len(steps_a) != len(steps_b) or not all(steps_a) or not all(steps_b):
        return None
    ratios = sorted(x / y for x, y in zip(steps_a, steps_b))
    middle = len(ratios) // 2
    return ratios[middle] if len(ratios) % 2 else math.sqrt(ratios[middle - 1] * ratios[middle])


def function_changes(a: Record, b: Record, event: str, top: int = FUNCTIONS_NAMED) -> str:
    """The functions whose own cost per example changed most from A to B ("+12.0k Ir/ex
    tensorflow::Foo [libtensorflow_cc.so.2]"), largest first; '' if none is known.

    Each record keeps only its costliest functions, so a function missing on one side is
    below that side's cut, not absent: it counts as new (or gone) only where its cost on
    the other side is above the cut, where it would have been listed."""
    fa, fb = a.count_functions or {}, b.count_functions or {}
    cut_a = min((f.get(event, 0.0) for f in fa.values()), default=0.0)
    cut_b = min((f.get(event, 0.0) for f in fb.values()), default=0.0)
    changes = []
    for name in set(fa) | set(fb):
        before, after = (fa.get(name) or {}).get(event), (fb.get(name) or {}).get(event)
        if before is None and (after or 0.0) <= cut_a or after is None and (before or 0.0) <= cut_b:
            continue  # below the cut on one side: its change is not known
        before, after = before or 0.0, after or 0.0
        if before or after:
            changes.append((after - before, name, before))
    changes.sort(key=lambda c: -abs(c[0]))
    unit = "Ir" if event == "Ir" else "cycles"
    parts = []
    for delta, name, before in changes[:top]:
        if abs(delta) < 0.5:
            continue
        relative = f" ({delta / before:+.0%})" if before else " (new)"
        parts.append(f"{delta:+,.0f} {unit}/ex{relative} {_short(name)}")
    return "; ".join(parts)


def _short(name: str, width: int = 90) -> str:
    """A C++ name cut to what a table can hold: the start and the object file."""
    function, _, obj = name.rpartition(" [")
    function = function if len(function) <= width else function[: width - 3] + "..."
    return f"{function} [{obj}" if obj else name


def _status(record: Record) -> str:
    if record.ok:
        return "ok but not counted"
    return f"{record.status} ({record.reason})" if record.reason else str(record.status)


def _matches(patterns: tuple[str, ...], cell_id: str, record: Record) -> bool:
    import fnmatch

    label = cell_id.rsplit("-", 1)[0]
    return any(fnmatch.fnmatchcase(name, p) for p in patterns for name in (cell_id, label))
