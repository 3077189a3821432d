"""A difference report between two sides, as pure data, and its renderings.

`compare` (two stored runs) and `ab` (an interleaved A/B run) decide differently but
report alike: per cell a verdict, both medians, the change with its 95% interval, the
test's p-value and what it rests on (windows, processes or paired rounds), then notes,
the rule, and the summary line last (google/benchmark's split between the difference
report and its rendering).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..results import Results, clean_json
from ..tables import markdown_text, render_table as render_rows

# "failed": the current side failed (or timed out) where the baseline measured the cell: a
# CI gate whose head crashes must fail. A cell only the baseline failed is "not compared".
VERDICTS = ("regressed", "improved", "unchanged", "failed", "not compared")


@dataclass
class CellDifference:
    cell_id: str
    status: str  # one of VERDICTS
    baseline: float | None = None  # median samples/s
    current: float | None = None
    ratio: float | None = None  # current / baseline
    ratio_low: float | None = None
    ratio_high: float | None = None
    p_value: float | None = None
    samples: tuple[int, int] = (0, 0)  # how many of `unit` each side had
    unit: str = "windows"  # windows | processes | rounds
    detectable: float | None = None  # the slowdown (as a positive fraction) this cell's test detects with 80% power
    note: str = ""
    p_adjusted: float | None = None  # ab: Holm-adjusted over the suite's cells (the verdict uses it)
    detect_slowdown: float | None = None  # ab: the slowdown (negative) detected with 80% power
    detect_speedup: float | None = None  # ab: the speed-up (positive) likewise
    slow_mode: bool = False  # ab: regressed because B alone split into a slow mode (stats.slow_mode)
    log_se: float | None = None  # ab: standard error of the mean log ratio (the gate's ledger chains them)
    huge_pages_mb: tuple[float, float] | None = None  # ab: A's and B's median worker memory in huge pages
    placement: bool = False  # ab: regressed because B's worker lost the huge pages A's had
    gated: bool = True  # False: its verdict is shown but does not fail the run (ab --cycles-cells)

    def basis(self) -> str:
        if self.unit == "counted":
            return "counted (callgrind)"
        if self.unit == "rounds":
            floor = (f", detects {self.detect_slowdown:+.1%} / {self.detect_speedup:+.1%}"
                     if self.detect_slowdown is not None else "")
            return f"{self.samples[0]} paired rounds{floor}"
        return f"{self.samples[0]} vs {self.samples[1]} {self.unit}"


@dataclass
class SuiteDifference:
    """`ab`: the geometric mean of every compared cell's ratio, tested over the rounds."""

    status: str  # regressed | improved | unchanged
    ratio: float
    ratio_low: float
    ratio_high: float
    p_value: float
    rounds: int
    cells: int
    detect_slowdown: float
    detect_speedup: float
    alpha: float
    max_regression: float
    log_se: float | None = None  # standard error of the mean log ratio over the rounds

    def line(self) -> str:
        if math.isnan(self.p_value):  # counted: no test, a threshold
            return (f"suite ({self.cells} cells, counted): {_pct(self.ratio)} (threshold {self.max_regression:.1%}): "
                    f"{self.status.upper() if self.status != 'unchanged' else 'unchanged'}")
        interval = (f" [{_pct(self.ratio_low)}, {_pct(self.ratio_high)}]" if math.isfinite(self.ratio_low) else "")
        return (f"suite ({self.cells} cells, {self.rounds} rounds): {_pct(self.ratio)}{interval} at "
                f"{1 - self.alpha:.0%}, p {self.p_value:.3g}, detects {self.detect_slowdown:+.1%} / "
                f"{self.detect_speedup:+.1%}: {self.status.upper() if self.status != 'unchanged' else 'unchanged'}")


@dataclass
class DifferenceReport:
    cells: list[CellDifference] = field(default_factory=list)
    names: tuple[str, str] = ("baseline", "current")
    rule: str = ""  # the decision rule, in words
    notes: list[str] = field(default_factory=list)  # what the reader must know before trusting a verdict
    only_in_baseline: list[str] = field(default_factory=list)
    only_in_current: list[str] = field(default_factory=list)
    environment_warnings: list[str] = field(default_factory=list)
    power_warnings: list[str] = field(default_factory=list)
    max_regression: float = 0.10
    alpha: float = 0.01
    shift: float | None = None  # the change every cell shared (stored runs), as a fraction
    shift_status: str = "unchanged"  # a shared shift beyond its limit is a finding of its own
    metric: str = "wall"  # wall | cpu: which time the rates are per
    unit: str = "samples/s"
    suite: SuiteDifference | None = None  # ab: the suite-level test
    confidence: float = 0.95  # of the cells' intervals
    counted: bool = False  # ab --count: deterministic counts, no interval and no test
    gated: bool = True  # False: shown, but its verdicts do not set the exit code
    side_differences: list[str] = field(default_factory=list)  # ab: what differs between the sides' fingerprints

    def count(self, status: str) -> int:
        return sum(1 for c in self.cells if c.status == status)

    @property
    def compared(self) -> int:
        return sum(1 for c in self.cells if c.status not in ("not compared", "failed"))

    def summary(self) -> str:
        line = (f"{self.compared} cells compared, {self.count('regressed')} regressed, "
                f"{self.count('improved')} improved, {self.count('unchanged')} unchanged")
        failed = [c.cell_id for c in self.cells if c.status == "failed"]
        if failed:
            line += (f"; {len(failed)} FAILED in {self.names[1]}: {', '.join(failed[:3])}"
                     + (f" and {len(failed) - 3} more" if len(failed) > 3 else ""))
        if self.shift_status != "unchanged":
            line += f"; the whole run {self.shift_status} ({self.shift:+.1%} shared by all cells)"
        if self.suite is not None:
            p = "" if math.isnan(self.suite.p_value) else f" (p {self.suite.p_value:.2g})"
            line += f"; suite {_pct(self.suite.ratio)}{p} {self.suite.status}"
        what = {"wall": "", "cpu": "cpu time: "}.get(self.metric, f"counted {self.metric}: ")
        unchecked = self.unchecked()
        return what + line + (f"; NOTHING COMPARED: {unchecked}" if unchecked else "")

    def unchecked(self) -> str | None:
        """Why nothing could be compared (no cell measured on both sides), or None: a check
        that could not run is a failure, never a pass."""
        if self.compared or self.count("failed"):
            return None
        if not self.cells:
            return "no cell to compare"
        notes = sorted({c.note for c in self.cells if c.note})
        return (f"none of the {len(self.cells)} cell(s) was measured on both sides"
                + (f" ({'; '.join(notes[:2])})" if notes else ""))

    def exit_code_for(self, fail_on: str = "any") -> int:
        """2 when nothing could be compared; 1 on a failed cell, or a regression (`fail_on`
        "suite": of the suite only); else 0."""
        if self.unchecked():
            return 2
        suite = self.suite is not None and self.suite.status == "regressed"
        regressed = sum(1 for c in self.cells if c.status == "regressed" and c.gated)
        cells = fail_on == "any" and (regressed or self.shift_status == "regressed")
        return 1 if self.gated and (suite or cells) or self.count("failed") else 0

    @property
    def exit_code(self) -> int:
        return self.exit_code_for("any")


def verdict(ratio: float, p: float, max_regression: float, alpha: float, noise_factor: float | None = None) -> str:
    """regressed / improved only when the change is beyond `max_regression` (and, where
    given, beyond a `noise_factor` either way: ratio below 1/F or above F) AND the test is
    significant; otherwise unchanged."""
    low, high = 1.0 - max_regression, 1.0 + max_regression
    if noise_factor is not None:
        low, high = min(low, 1.0 / noise_factor), max(high, noise_factor)
    if p < alpha and ratio < low:
        return "regressed"
    if p < alpha and ratio > high:
        return "improved"
    return "unchanged"


def _pct(ratio: float | None) -> str:
    return "" if ratio is None else f"{(ratio - 1.0) * 100:+.1f}%"


def _header(report: DifferenceReport) -> list[str]:
    first, second = report.names
    if report.counted:
        return ["cell", "verdict", f"{first} {report.unit}", f"{second} {report.unit}", "change", "basis",
                "where (functions whose own cost per example changed most)"]
    return ["cell", "verdict", f"{first} {report.unit}", f"{second} {report.unit}", "change",
            f"{report.confidence:.0%} CI of change", "p (Holm)" if report.suite is not None else "p", "basis", "note"]


def _rows(report: DifferenceReport) -> list[list[str]]:
    rows = []
    for c in report.cells:
        if c.status in ("not compared", "failed"):
            baseline = f"{c.baseline:,.0f}" if c.baseline is not None else ""
            blanks = 3 if report.counted else 5
            rows.append([c.cell_id, c.status.upper() if c.status == "failed" else c.status, baseline,
                         *[""] * blanks, c.note])
            continue
        interval = f"{_pct(c.ratio_low)} .. {_pct(c.ratio_high)}" if c.ratio_low is not None else ""
        if report.counted:
            rows.append([c.cell_id, c.status.upper() if c.status != "unchanged" else c.status, f"{c.baseline:,.0f}",
                         f"{c.current:,.0f}", _pct(c.ratio), c.basis(), c.note])
            continue
        rows.append([
            c.cell_id, c.status.upper() if c.status != "unchanged" else c.status,
            f"{c.baseline:,.0f}", f"{c.current:,.0f}", _pct(c.ratio), interval,
            _p_text(c), c.basis(), c.note,
        ])
    return rows


def _p_text(c: CellDifference) -> str:
    if c.p_value is None:
        return ""
    return f"{c.p_value:.3g} ({c.p_adjusted:.3g})" if c.p_adjusted is not None else f"{c.p_value:.3g}"


def _warnings(report: DifferenceReport) -> list[str]:
    lines = []
    for w in report.environment_warnings:
        lines.append(f"WARNING: environment {w}: this comparison measures the machine, not the code")
    lines += [f"note: the sides differ in {d}" for d in report.side_differences]
    lines += [f"warning: {w}" for w in report.power_warnings]
    lines += [f"note: {n}" for n in report.notes]
    lines += [f"only in {report.names[0]}: {cid}" for cid in report.only_in_baseline]
    lines += [f"only in {report.names[1]}: {cid}" for cid in report.only_in_current]
    return lines


def render_table(report: DifferenceReport) -> str:
    lines = _warnings(report)
    lines += [render_rows(_header(report), _rows(report), "text")]
    lines += [*([report.suite.line()] if report.suite else []), "", report.rule, report.summary()]
    return "\n".join(lines)


def render_markdown(report: DifferenceReport) -> str:
    lines = [f"> {markdown_text(w)}" for w in _warnings(report)]
    if lines:
        lines.append("")
    lines += [render_rows(_header(report), _rows(report), "markdown")]
    lines += [*(["", report.suite.line()] if report.suite else []), "", report.rule, "", report.summary()]
    return "\n".join(lines)


def render_json(report: DifferenceReport) -> str:
    payload = {
        "cells": [asdict(c) for c in report.cells],
        "names": list(report.names),
        "rule": report.rule,
        "notes": report.notes,
        "only_in_baseline": report.only_in_baseline,
        "only_in_current": report.only_in_current,
        "environment_warnings": report.environment_warnings,
        "side_differences": report.side_differences,
        "power_warnings": report.power_warnings,
        "max_regression": report.max_regression,
        "alpha": report.alpha,
        "shift": report.shift,
        "shift_status": report.shift_status,
        "metric": report.metric,
        "unit": report.unit,
        "gated": report.gated,
        "counted": report.counted,
        "suite": asdict(report.suite) if report.suite is not None else None,
        "summary": report.summary(),
        **{status: report.count(status) for status in ("regressed", "improved", "unchanged", "failed")},
    }
    return json.dumps(clean_json(payload), indent=2, allow_nan=False)


RENDERERS = {"table": render_table, "markdown": render_markdown, "json": render_json}


def render_all(reports: list[DifferenceReport], fmt: str) -> str:
    """Several reports of one comparison (wall time, then CPU time): each in turn, then, in
    text, one line with every summary (the line a CI log ends on). In JSON the first
    report's object, with the others under their metric's name."""
    if fmt == "json":
        payload = json.loads(render_json(reports[0]))
        for other in reports[1:]:
            payload[other.metric] = json.loads(render_json(other))
        return json.dumps(payload, indent=2, allow_nan=False)
    text = "\n\n".join(RENDERERS[fmt](r) for r in reports)
    if len(reports) > 1:
        text += "\n\n" + " | ".join(r.summary() for r in reports)
    return text


def github_benchmark(current: Results) -> list[dict[str, Any]]:
    """A run in github-action-benchmark's `customBiggerIsBetter` shape."""
    out = []
    for record in current.latest():
        if not record.ok:
            continue
        low, high = record.samples_per_sec_low, record.samples_per_sec_high
        entry = {"name": record.cell_id, "unit": "samples/s", "value": record.samples_per_sec}
        if low is not None and high is not None:
            entry["range"] = f"{low:.0f} .. {high:.0f} (95% CI)"
        processes = record.processes or 1
        entry["extra"] = (f"{processes} process(es), {len(record.windows or [])} windows, "
                          f"CV {record.cv or 0:.1%}")
        out.append(entry)
    return out
