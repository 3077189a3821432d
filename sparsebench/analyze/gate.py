"""The regression gate's policy: what a tier's findings mean for CI, and what accepts them.

`ab` decides which cells changed (`paired`, `counted`); this module decides what the gate
does with that, as pure data (the self-gate in `.ci/self_gate.py` and `sparsebench bisect`
run the tiers and print what it says):

- a tier **fails** on a failed cell (B failed, timed out or skipped where A measured it),
  on a regressed cell or suite that no acceptance covers, and on a tier that compared
  nothing (a check that could not run is a failure, never a pass);
- an **acceptance** is a line in a commit message of the change being gated (never of an
  older commit: the reference moves to the landed main at every piece of work):

      perf-accepted: cells=fused-* max=8% tier=time reason=the copy fixes a race (#42)

  It names the cells (a shell pattern on the cell's id or label; `suite` for a tier's
  suite line), the tier (`counted`, `time`, `headline`, or `any`) and the largest slowdown it
  accepts; a regression beyond it, in another cell or another tier, still fails, and a
  failed cell is never accepted. Every acceptance used is printed.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError
from .paired import PairedRule

TIERS = ("counted", "time", "headline")


@dataclass(frozen=True)
class TimedTier:
    """A timed tier of the self-gate: its suite, its rounds and how `ab` decides it. The
    simulation in tests/test_gate_stats.py decides with these very values."""

    suite: str
    rounds: int
    rule: PairedRule

    def ab_options(self) -> list[str]:
        r = self.rule
        return ["--suite", self.suite, "--rounds", str(self.rounds), "--max-regression", f"{r.max_regression * 100:g}",
                "--alpha", f"{r.alpha:g}", "--suite-alpha", f"{r.suite_alpha:g}",
                "--max-suite-regression", f"{r.max_suite_regression * 100:g}", "--mode-floor", f"{r.mode_floor * 100:g}",
                "--mode-alpha", f"{r.mode_alpha:g}", "--test", r.test, "--fail-on", "any"]


# The gate suite (12 cells, in cache, one process per side and round): a cell fails beyond
# 10% at Holm p < 0.01, the suite's geometric mean beyond 2%; the headline suite (4 cells
# at the shapes users run, one process per cell): a cell beyond 3%. README: "The self-gate".
TIMED_TIERS = {
    "time": TimedTier("gate", 8, PairedRule(max_regression=0.10, alpha=0.01, suite_alpha=0.002,
                                            max_suite_regression=0.02)),
    "headline": TimedTier("headline", 8, PairedRule(max_regression=0.03, alpha=0.002, suite_alpha=0.002,
                                                    max_suite_regression=0.03)),
}
ACCEPT_LINE = re.compile(r"^[ \t]*perf-accepted:(.*)$", re.MULTILINE)
ACCEPT_FIELDS = re.compile(r"(cells|max|tier|reason)=(.*?)(?=\s+(?:cells|max|tier|reason)=|\s*$)")
ACCEPT_FORM = "perf-accepted: cells=GLOB max=PCT% tier=counted|time|headline|any reason=TEXT"


@dataclass(frozen=True)
class Acceptance:
    """One `perf-accepted:` line of a gated commit."""

    commit: str
    cells: str  # a shell pattern on cell id or label; "suite" matches a tier's suite line
    max_slowdown: float  # the largest slowdown accepted, as a fraction (0.08 for 8%)
    tier: str  # one of TIERS, or "any"
    reason: str

    def covers(self, tier: str, cell: str, label: str, slowdown: float) -> bool:
        return (self.tier in ("any", tier) and slowdown <= self.max_slowdown + 1e-12
                and any(fnmatch.fnmatchcase(name, self.cells) for name in (cell, label)))

    def describe(self) -> str:
        return (f"perf-accepted in {self.commit[:12]}: cells={self.cells} max={self.max_slowdown:.0%} "
                f"tier={self.tier} ({self.reason})")


def parse_acceptances(messages: list[tuple[str, str]]) -> tuple[list[Acceptance], list[str]]:
    """The acceptances in (commit, message) pairs, and one problem line per malformed one
    (a malformed acceptance fails the gate: it was meant to accept something)."""
    found, problems = [], []
    for commit, message in messages:
        for line in ACCEPT_LINE.findall(message):
            fields = dict(ACCEPT_FIELDS.findall(line.strip()))
            problem = _acceptance_problem(fields)
            if problem:
                problems.append(f"{commit[:12]}: 'perf-accepted:{line}': {problem} (write {ACCEPT_FORM})")
                continue
            found.append(Acceptance(commit, fields["cells"].strip(), float(fields["max"].strip().rstrip("%")) / 100.0,
                                    fields["tier"].strip(), fields["reason"].strip()))
    return found, problems


def _acceptance_problem(fields: dict[str, str]) -> str | None:
    missing = [name for name in ("cells", "max", "tier", "reason") if not fields.get(name, "").strip()]
    if missing:
        return f"no {', '.join(missing)}"
    if fields["tier"].strip() not in (*TIERS, "any"):
        return f"tier {fields['tier'].strip()!r} is not one of {', '.join(TIERS)}, any"
    try:
        value = float(fields["max"].strip().rstrip("%"))
    except ValueError:
        return f"max {fields['max'].strip()!r} is not a percentage"
    if not 0 < value < 100:
        return f"max {value:g}% must be between 0 and 100"
    return None


# -- a tier's findings -----------------------------------------------------------------------
@dataclass
class Finding:
    """One thing a tier found that fails the gate unless accepted."""

    tier: str
    metric: str
    cell: str  # the cell's id, or "suite"
    label: str
    kind: str  # regressed | slow mode | placement | failed | nothing compared
    slowdown: float | None  # as a positive fraction (None: not a slowdown, e.g. a failed cell)
    text: str
    accepted_by: Acceptance | None = None

    @property
    def acceptable(self) -> bool:
        return self.kind in ("regressed", "slow mode", "placement") and self.slowdown is not None

    def line(self) -> str:
        said = f"{self.tier} tier, {self.metric}: {self.text}"
        return f"{said}: ACCEPTED by {self.accepted_by.describe()}" if self.accepted_by else said


def _label(cell_id: str) -> str:
    first = cell_id.split(" vs ")[0]
    return first.rsplit("-", 1)[0] if "-" in first else first


def metric_reports(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Every metric's report in one `ab --format json` document: the first at the top
    level, the others under their metric's name (`difference.render_all`)."""
    return [payload, *[v for v in payload.values()
                       if isinstance(v, dict) and "metric" in v and isinstance(v.get("cells"), list)]]


def tier_findings(tier: str, payload: dict[str, Any]) -> list[Finding]:
    """What one tier's `ab --format json` output holds that fails a gate, in every metric."""
    findings: list[Finding] = []
    for report in metric_reports(payload):
        metric = str(report.get("metric", "?"))
        cells = report.get("cells") or []
        gated = report.get("gated", True) is not False
        compared = [c for c in cells if c.get("status") not in ("not compared", "failed")]
        if not compared and not any(c.get("status") == "failed" for c in cells):
            findings.append(Finding(tier, metric, "suite", "suite", "nothing compared", None,
                                    f"no cell was measured on both sides ({len(cells)} cell(s))"))
            continue
        for c in cells:
            cell_id, status = str(c.get("cell_id")), c.get("status")
            ratio = c.get("ratio")
            slowdown = 1.0 - ratio if isinstance(ratio, (int, float)) else None
            if status == "failed":
                findings.append(Finding(tier, metric, cell_id, _label(cell_id), "failed", None,
                                        f"{cell_id} FAILED: {c.get('note', '')}"))
            elif status == "regressed" and gated and c.get("gated", True):
                kind = "placement" if c.get("placement") else "slow mode" if c.get("slow_mode") else "regressed"
                findings.append(Finding(tier, metric, cell_id, _label(cell_id), kind,
                                        max(0.0, slowdown) if kind == "placement" and slowdown is not None else slowdown,
                                        f"{cell_id} {kind.upper()} {(ratio - 1) * 100:+.1f}%"
                                        + (f" ({c['note']})" if c.get("note") else "")))
        suite = report.get("suite")
        if gated and isinstance(suite, dict) and suite.get("status") == "regressed":
            findings.append(Finding(tier, metric, "suite", "suite", "regressed", 1.0 - float(suite["ratio"]),
                                    f"suite (geometric mean of {suite.get('cells')} cells) REGRESSED "
                                    f"{(float(suite['ratio']) - 1) * 100:+.1f}%"))
    return findings


def accept(findings: list[Finding], acceptances: list[Acceptance]) -> list[Finding]:
    """The findings with what accepts them filled in; only a regression or slow mode
    within an acceptance's cells, tier and size is accepted."""
    for finding in findings:
        if finding.acceptable:
            finding.accepted_by = next((a for a in acceptances
                                        if a.covers(finding.tier, finding.cell, finding.label, finding.slowdown)), None)
    return findings


@dataclass
class GateVerdict:
    findings: list[Finding] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # the gate itself could not decide (reference, acceptance, ...)

    @property
    def failing(self) -> list[Finding]:
        return [f for f in self.findings if f.accepted_by is None]

    @property
    def accepted(self) -> list[Finding]:
        return [f for f in self.findings if f.accepted_by is not None]

    @property
    def exit_code(self) -> int:
        return 1 if self.failing or self.problems else 0

    def lines(self) -> list[str]:
        out = [f"PROBLEM: {p}" for p in self.problems]
        out += [f"FAIL: {f.line()}" for f in self.failing]
        out += [f"accepted: {f.line()}" for f in self.accepted]
        if not out:
            out.append("pass: no regression in any tier, every cell compared")
        return out


def slower(tier: str, payload: dict[str, Any]) -> tuple[bool, list[str], list[str]]:
    """`sparsebench bisect`'s verdict on one comparison: whether B is slower (a regressed
    or failed cell, a slow mode or a regressed suite, in any metric), what was found, and
    for counted work the functions each flagged cell names."""
    found = tier_findings(tier, payload)
    nothing = [f for f in found if f.kind == "nothing compared"]
    if nothing:  # a comparison that could not run says nothing about the commit
        raise UserError(f"{tier} tier, {nothing[0].metric}: {nothing[0].text}")
    where = [f"{c['cell_id']}: {c['note']}" for report in metric_reports(payload) if report.get("gated", True)
             for c in report.get("cells") or [] if c.get("status") == "regressed" and c.get("note")]
    return bool(found), [f.text for f in found], where if tier == "counted" else []
