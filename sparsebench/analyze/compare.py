"""`sparsebench compare`: a statistical throughput-regression gate.

A cell regresses when its throughput fell by more than `max_regression` (ratio of
medians) AND a two-sided Mann-Whitney U test on the per-window samples/s is significant
at `alpha` (asv's rule: both a factor and significance; google/benchmark's test). An
improvement is the mirror image. Higher is better: ratio = current / baseline.

`difference_report` is pure data; `render_*` format it (google/benchmark's split).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..errors import UserError
from ..machine import environment_differences
from ..results import Results, clean_json
from ..stats import bootstrap_ratio_interval, mann_whitney_min_p, mann_whitney_p


@dataclass
class CellDifference:
    cell_id: str
    status: str  # regressed | improved | unchanged | not compared
    baseline: float | None = None
    current: float | None = None
    ratio: float | None = None
    ratio_low: float | None = None
    ratio_high: float | None = None
    p_value: float | None = None
    windows: tuple[int, int] = (0, 0)
    note: str = ""


@dataclass
class DifferenceReport:
    cells: list[CellDifference] = field(default_factory=list)
    only_in_baseline: list[str] = field(default_factory=list)
    only_in_current: list[str] = field(default_factory=list)
    environment_warnings: list[str] = field(default_factory=list)
    power_warnings: list[str] = field(default_factory=list)
    max_regression: float = 0.10
    alpha: float = 0.01

    def count(self, status: str) -> int:
        return sum(1 for c in self.cells if c.status == status)

    @property
    def compared(self) -> int:
        return sum(1 for c in self.cells if c.status != "not compared")

    def summary(self) -> str:
        return (f"{self.compared} cells compared, {self.count('regressed')} regressed, "
                f"{self.count('improved')} improved, {self.count('unchanged')} unchanged")

    @property
    def exit_code(self) -> int:
        return 1 if self.count("regressed") else 0


def _threads(record: dict[str, Any]) -> tuple | None:
    effect = record.get("threads_in_effect")
    if not effect:
        return None
    return tuple(effect.get(k) for k in ("intra_op_threads_resolved", "inter_op_threads_resolved",
                                         "omp_num_threads", "mkl_num_threads", "tf_enable_onednn_opts"))


def difference_report(baseline: Results, current: Results, max_regression: float = 0.10,
                      alpha: float = 0.01) -> DifferenceReport:
    if not 0 < max_regression < 1:
        raise UserError(f"--max-regression: must be between 0 and 100 percent, got {max_regression * 100:g}")
    if not 0 < alpha < 1:
        raise UserError(f"--alpha: must be between 0 and 1, got {alpha:g}")
    base = {r["cell_id"]: r for r in baseline.latest()}
    cur = {r["cell_id"]: r for r in current.latest()}
    common = [cid for cid in base if cid in cur]
    if not common:
        raise UserError(f"{baseline.path} and {current.path} have no cell in common (different suites or settings?)")
    report = DifferenceReport(max_regression=max_regression, alpha=alpha)
    report.only_in_baseline = [cid for cid in base if cid not in cur]
    report.only_in_current = [cid for cid in cur if cid not in base]
    report.environment_warnings = environment_differences(baseline.environment, current.environment)
    thread_changes = [cid for cid in common if _threads(base[cid]) and _threads(cur[cid])
                      and _threads(base[cid]) != _threads(cur[cid])]
    if thread_changes:
        report.environment_warnings.append(
            f"thread settings in effect differ for {len(thread_changes)} cell(s), e.g. {thread_changes[0]}")
    underpowered = set()
    for cid in common:
        diff = _compare_cell(cid, base[cid], cur[cid], max_regression, alpha)
        report.cells.append(diff)
        if diff.status != "not compared" and mann_whitney_min_p(*diff.windows) > alpha:
            underpowered.add(diff.windows)
    for n, m in sorted(underpowered):
        report.power_warnings.append(
            f"with {n} and {m} windows the U test cannot reach p < {alpha:g} (smallest possible p = "
            f"{mann_whitney_min_p(n, m):.3g}): such cells can never be flagged; measure more windows")
    return report


def _compare_cell(cid: str, base: dict, cur: dict, max_regression: float, alpha: float) -> CellDifference:
    if base.get("status") != "ok" or cur.get("status") != "ok":
        return CellDifference(cid, "not compared",
                              note=f"baseline {_status(base)}, current {_status(cur)}")
    a = np.asarray(base.get("windows") or [], dtype=float)
    b = np.asarray(cur.get("windows") or [], dtype=float)
    if len(a) == 0 or len(b) == 0:
        return CellDifference(cid, "not compared", note="no windows stored")
    ratio = float(np.median(b) / np.median(a)) if np.median(a) > 0 else float("nan")
    if not math.isfinite(ratio):
        return CellDifference(cid, "not compared", note="no usable median (zero, NaN or infinite windows)")
    low, high = bootstrap_ratio_interval(a, b)
    p = mann_whitney_p(a, b)
    status = "unchanged"
    if p < alpha and ratio < 1.0 - max_regression:
        status = "regressed"
    elif p < alpha and ratio > 1.0 + max_regression:
        status = "improved"
    return CellDifference(cid, status, float(np.median(a)), float(np.median(b)), ratio, low, high, p,
                          (len(a), len(b)))


def _status(record: dict) -> str:
    reason = record.get("reason")
    return f"{record.get('status')} ({reason})" if reason else str(record.get("status"))


# -- rendering -------------------------------------------------------------------------
def _pct(ratio: float | None) -> str:
    return "" if ratio is None else f"{(ratio - 1.0) * 100:+.1f}%"


def _rows(report: DifferenceReport) -> list[list[str]]:
    rows = []
    for c in report.cells:
        if c.status == "not compared":
            rows.append([c.cell_id, c.status, "", "", "", "", "", c.note])
            continue
        rows.append([
            c.cell_id, c.status.upper() if c.status != "unchanged" else c.status,
            f"{c.baseline:,.0f}", f"{c.current:,.0f}", _pct(c.ratio),
            f"{_pct(c.ratio_low)} .. {_pct(c.ratio_high)}", f"{c.p_value:.3g}", f"{c.windows[0]} vs {c.windows[1]} windows",
        ])
    return rows


HEADER = ["cell", "verdict", "baseline samples/s", "current samples/s", "change", "95% CI of change", "U test p", "note"]


def _warnings(report: DifferenceReport) -> list[str]:
    lines = []
    for w in report.environment_warnings:
        lines.append(f"WARNING: environment {w}: this comparison measures the machine, not the code")
    lines += [f"warning: {w}" for w in report.power_warnings]
    lines += [f"only in baseline: {cid}" for cid in report.only_in_baseline]
    lines += [f"only in current: {cid}" for cid in report.only_in_current]
    return lines


def render_table(report: DifferenceReport) -> str:
    rows = _rows(report)
    widths = [max(len(HEADER[i]), *(len(r[i]) for r in rows)) for i in range(len(HEADER))]
    lines = _warnings(report)
    rule = (f"regressed/improved: change beyond {report.max_regression:.0%} and Mann-Whitney U p < {report.alpha:g}")
    lines += ["  ".join(h.ljust(w) for h, w in zip(HEADER, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    lines += ["", rule, report.summary()]
    return "\n".join(lines)


def render_markdown(report: DifferenceReport) -> str:
    lines = [f"> {w}" for w in _warnings(report)]
    if lines:
        lines.append("")
    lines += ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in _rows(report)]
    lines += ["", f"regressed/improved: change beyond {report.max_regression:.0%} and Mann-Whitney U p < {report.alpha:g}",
              "", report.summary()]
    return "\n".join(lines)


def render_json(report: DifferenceReport) -> str:
    payload = {
        "cells": [asdict(c) for c in report.cells],
        "only_in_baseline": report.only_in_baseline,
        "only_in_current": report.only_in_current,
        "environment_warnings": report.environment_warnings,
        "power_warnings": report.power_warnings,
        "max_regression": report.max_regression,
        "alpha": report.alpha,
        "summary": report.summary(),
        "regressed": report.count("regressed"),
        "improved": report.count("improved"),
        "unchanged": report.count("unchanged"),
    }
    return json.dumps(clean_json(payload), indent=2, allow_nan=False)


def github_benchmark(current: Results) -> list[dict[str, Any]]:
    """The current run in github-action-benchmark's `customBiggerIsBetter` shape."""
    out = []
    for record in current.latest():
        if record.get("status") != "ok":
            continue
        low, high = record.get("samples_per_sec_low"), record.get("samples_per_sec_high")
        entry = {"name": record["cell_id"], "unit": "samples/s", "value": record["samples_per_sec"]}
        if low is not None and high is not None:
            entry["range"] = f"{low:.0f} .. {high:.0f} (95% CI)"
        entry["extra"] = f"{len(record.get('windows') or [])} windows, CV {record.get('cv') or 0:.1%}"
        out.append(entry)
    return out
