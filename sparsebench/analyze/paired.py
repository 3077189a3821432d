"""Deciding an interleaved A/B run: per cell, the paired ratios of its rounds.

Each round measured every cell once on side A and once on side B, close together in
time, so the ratio B/A of one round is free of the drift between rounds. Over R rounds a
cell has R paired ratios; a paired test on their logs (`stats.paired_test`) says whether
B differs from A, and the spread of those ratios says how small a change this machine
could have shown (`detectable`: the noise floor an A/A run reports).

Cells pair by their place in the suite's expansion, which both sides share when they
run the same suite file; a side whose settings change a cell's id (say
`--b-set intra_op_threads=1`) still pairs cell for cell.
"""

from __future__ import annotations

import statistics

from ..errors import UserError
from ..record import Record, round_rate
from ..results import Results
from ..stats import PAIRED_TESTS, paired_test, wilcoxon_min_p
from .difference import CellDifference, DifferenceReport, verdict


def _rounds(results: Results) -> list[tuple[str, dict[int, Record]]]:
    """(cell id, round -> record) in expansion order."""
    return list(results.by_round().items())


def check_options(*, max_regression: float, alpha: float, test: str) -> None:
    """The decision's options, checked before `ab` measures anything (a bad one would
    otherwise fail after minutes of rounds)."""
    if not 0 < max_regression < 1:
        raise UserError(f"--max-regression: must be between 0 and 100 percent, got {max_regression * 100:g}")
    if not 0 < alpha < 1:
        raise UserError(f"--alpha: must be between 0 and 1, got {alpha:g}")
    if test not in PAIRED_TESTS:
        raise UserError(f"--test: must be one of {', '.join(PAIRED_TESTS)}, got {test!r}")


def paired_report(a: Results, b: Results, *, max_regression: float = 0.10, alpha: float = 0.05, test: str = "t",
                  aa: bool = False) -> DifferenceReport:
    check_options(max_regression=max_regression, alpha=alpha, test=test)
    cells_a, cells_b = _rounds(a), _rounds(b)
    if len(cells_a) != len(cells_b):
        raise UserError(f"{a.path} holds {len(cells_a)} cells and {b.path} {len(cells_b)}: not two sides of one A/B run")
    test_name = "paired t-test on log ratios" if test == "t" else "Wilcoxon signed-rank test on log ratios"
    report = DifferenceReport(names=("A", "B"), max_regression=max_regression, alpha=alpha,
                              rule=f"regressed/improved: B's change beyond {max_regression:.0%} and a {test_name} "
                                   f"over the rounds with p < {alpha:g}")
    floors = []
    for (id_a, rounds_a), (id_b, rounds_b) in zip(cells_a, cells_b):
        label = id_a if id_a == id_b else f"{id_a} vs {id_b}"
        diff = _pair_cell(label, rounds_a, rounds_b, max_regression, alpha, test)
        report.cells.append(diff)
        if diff.detectable is not None and diff.status != "not compared":
            floors.append(diff.detectable)
    rounds = max((c.samples[0] for c in report.cells), default=0)
    if test == "wilcoxon" and wilcoxon_min_p(rounds) > alpha:
        report.power_warnings.append(
            f"with {rounds} rounds the signed-rank test cannot reach p < {alpha:g} (smallest possible p = "
            f"{wilcoxon_min_p(rounds):.3g}): no cell can be flagged; run more rounds or use --test t")
    blind = [c.cell_id for c in report.cells if c.detectable is not None and c.detectable > max_regression
             and c.status != "not compared"]
    if blind:
        report.power_warnings.append(
            f"{len(blind)} cell(s) varied so much from round to round that a {max_regression:.0%} change could not "
            f"reach p < {alpha:g} (e.g. {blind[0]}); run more rounds for them")
    if aa and floors:
        floors.sort()
        report.notes.append(
            f"A/A run (both sides identical): the noise floor, the smallest change this machine can detect at "
            f"alpha {alpha:g} with {rounds} rounds, is {floors[len(floors) // 2]:.1%} for the median cell "
            f"(from {floors[0]:.1%} to {floors[-1]:.1%}); any flagged cell here is a false alarm")
    return report


def _pair_cell(label: str, rounds_a: dict[int, Record], rounds_b: dict[int, Record], max_regression: float,
               alpha: float, test: str) -> CellDifference:
    common = sorted(r for r in rounds_a if r in rounds_b and rounds_a[r].ok and rounds_b[r].ok
                    and (round_rate(rounds_a[r]) or 0) > 0 and (round_rate(rounds_b[r]) or 0) > 0)
    missing = sorted((set(rounds_a) | set(rounds_b)) - set(common))
    # B crashed where A measured: a gate whose head fails a cell must fail, whatever the rest says.
    crashed = sorted(r for r in rounds_b if rounds_b[r].status in ("failed", "timeout")
                     and r in rounds_a and rounds_a[r].ok)
    if crashed:
        first = rounds_b[crashed[0]]
        a_rates = [round_rate(rounds_a[r]) for r in sorted(rounds_a) if rounds_a[r].ok and round_rate(rounds_a[r])]
        return CellDifference(label, "failed", baseline=float(statistics.median(a_rates)) if a_rates else None,
                              unit="rounds", samples=(len(common), len(common)),
                              note=f"B {first.status} in round(s) {', '.join(map(str, crashed))} where A measured it "
                                   f"({first.reason})")
    if len(common) < 2:
        statuses = {str(rec.status) for rec in [*rounds_a.values(), *rounds_b.values()]}
        return CellDifference(label, "not compared", unit="rounds", samples=(len(common), len(common)),
                              note=f"{len(common)} round(s) measured on both sides ({', '.join(sorted(statuses))})")
    a = [round_rate(rounds_a[r]) for r in common]
    b = [round_rate(rounds_b[r]) for r in common]
    result = paired_test(a, b, alpha, test)
    note = f"rounds {', '.join(map(str, missing))} not paired" if missing else ""
    return CellDifference(label, verdict(result.ratio, result.p_value, max_regression, alpha),
                          float(statistics.median(a)), float(statistics.median(b)), result.ratio,
                          result.ratio_low, result.ratio_high, result.p_value, (len(common), len(common)), "rounds",
                          result.detectable, note)
