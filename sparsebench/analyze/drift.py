"""The gate's ledger: every landing's gate result, chained, so that small slowdowns that
each passed their own gate cannot add up unseen.

Why ratios and not rates: CI lands on hosts that differ 2-4x in speed, so a cell's
samples/s from two landings say nothing about the code. What one gate run does measure
well is its own ratio B/A (both sides alternated on one machine). Each landing keeps one
small file, `results/gate/<commit>.json` (`LedgerEntry`): per tier, metric and cell the
mean log ratio against the landing's reference and its standard error. The entries chain:
the entry whose commit is (or differs only in `EQUIVALENT` paths from) the next entry's
reference comes before it. Summing the log ratios along the chain gives the cumulative
change since the chain began, and the standard errors add in quadrature.

The drift check fails (`Drift.exit_code` 1) when, over the chain's last `MAX_LANDINGS`
landings, a tier's suite or one of its cells lost more than its bound (`BOUNDS`) with a
one-sided p below alpha (Holm over the cells of a tier and metric), naming the landings
that contributed most. A landing that accepted a cell's slowdown (`perf-accepted:`) starts
that cell's chain afresh: an accepted slowdown was a decision, what follows is measured
from it. A chain that cannot reach the reference of the newest entry (an entry missing in
between) fails with exit 2: the check could not run.
"""

from __future__ import annotations

import fnmatch
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from scipy import stats as sps

from ..errors import UserError
from ..stats import holm
from .gate import metric_reports

SCHEMA = "sparsebench-gate-ledger"
VERSION = 1
MAX_LANDINGS = 20
ALPHA = 0.001  # one-sided, per trend (Holm over a family's cells): 20 chained A/A landings fail 0.7% (tests)
COUNTED_SE = 0.0003  # counted work repeats to a few hundredths of a percent: its floor of uncertainty
# The largest cumulative slowdown allowed: (tier, metric) -> (suite, any one cell).
BOUNDS: dict[tuple[str, str], tuple[float, float]] = {
    ("counted", "instructions"): (0.03, 0.05),
    ("counted", "cycles"): (0.05, 0.10),
    ("time", "wall"): (0.05, 0.10),
    ("time", "cpu"): (0.05, 0.10),
    ("headline", "wall"): (0.05, 0.08),
    ("headline", "cpu"): (0.05, 0.08),
}
# Paths whose change cannot change speed: an entry's commit and a later reference that
# differ only here are the same code.
EQUIVALENT = ("results/gate/*", "*.md", "docs/*")


@dataclass
class Change:
    """One cell's (or a suite's) change in one landing."""

    log_ratio: float
    log_se: float


@dataclass
class LedgerEntry:
    reference: str
    commit: str
    recorded_at: str
    host: str
    # tier -> metric -> cell label (or "suite") -> change
    changes: dict[str, dict[str, dict[str, Change]]]
    accepted: list[dict[str, Any]] = field(default_factory=list)  # tier, metric, cell, label, slowdown, by
    path: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "version": VERSION, "reference": self.reference, "commit": self.commit,
                "recorded_at": self.recorded_at, "host": self.host,
                "changes": {t: {m: {c: asdict(v) for c, v in cells.items()} for m, cells in metrics.items()}
                            for t, metrics in self.changes.items()},
                "accepted": self.accepted}

    def write(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.commit[:12]}.json"
        path.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")
        return path


def read_entry(path: Path) -> LedgerEntry:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable gate ledger entry: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise UserError(f"{path}: not a gate ledger entry (schema {data.get('schema') if isinstance(data, dict) else '?'!r})")
    if data.get("version") != VERSION:
        raise UserError(f"{path}: gate ledger version {data.get('version')!r}; this sparsebench reads {VERSION}")
    try:
        changes = {t: {m: {c: Change(float(v["log_ratio"]), float(v["log_se"])) for c, v in cells.items()}
                       for m, cells in metrics.items()} for t, metrics in data["changes"].items()}
        return LedgerEntry(str(data["reference"]), str(data["commit"]), str(data.get("recorded_at", "")),
                           str(data.get("host", "")), changes, list(data.get("accepted") or []), str(path))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"{path}: a damaged gate ledger entry ({type(exc).__name__}: {exc})") from None


def is_entry(path: Path) -> bool:
    """Whether `path` is a ledger entry (by its schema), without failing on anything else."""
    try:  # read whole: its keys are sorted, so "schema" comes after the changes (not in a prefix)
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("schema") == SCHEMA


def entries_in(paths: list[Path]) -> list[Path]:
    """Ledger entries among `paths` (files as given; folders searched for *.json)."""
    found = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*.json") if is_entry(p))
        elif path.exists() and is_entry(path):
            found.append(path)
    return found


def entry_from_reports(reference: str, commit: str, host: str, reports: dict[str, dict[str, Any]],
                       accepted: list[dict[str, Any]]) -> LedgerEntry:
    """A ledger entry from each tier's `ab --format json` output."""
    changes: dict[str, dict[str, dict[str, Change]]] = {}
    for tier, payload in reports.items():
        counted = tier == "counted"
        for report in metric_reports(payload):
            cells: dict[str, Change] = {}
            for c in report.get("cells") or []:
                ratio = c.get("ratio")
                if c.get("status") in ("failed", "not compared") or not ratio or ratio <= 0:
                    continue
                se = COUNTED_SE if counted else c.get("log_se")
                if se is None:
                    continue
                label = str(c["cell_id"]).split(" vs ")[-1].rsplit("-", 1)[0]
                cells[label] = Change(math.log(ratio), max(float(se), COUNTED_SE))
            suite = report.get("suite")
            if isinstance(suite, dict) and suite.get("ratio"):
                se = COUNTED_SE if counted else suite.get("log_se")
                if se is not None and math.isfinite(float(se)):
                    cells["suite"] = Change(math.log(float(suite["ratio"])), max(float(se), COUNTED_SE))
            if cells:
                changes.setdefault(tier, {})[str(report.get("metric"))] = cells
    return LedgerEntry(reference, commit, time.strftime("%Y-%m-%dT%H:%M:%S%z"), host, changes, accepted)


# -- the chain and its drift -----------------------------------------------------------------
@dataclass
class Trend:
    """One tier, metric and cell (or suite) summed along the chain."""

    tier: str
    metric: str
    cell: str
    landings: list[tuple[str, Change]]  # (commit, change), oldest first
    bound: float
    p: float = 1.0
    p_adjusted: float = 1.0
    restarted_after: str | None = None  # the landing whose acceptance this chain starts after

    @property
    def log_total(self) -> float:
        return sum(c.log_ratio for _, c in self.landings)

    @property
    def log_se(self) -> float:
        return math.sqrt(sum(c.log_se ** 2 for _, c in self.landings))

    @property
    def total(self) -> float:
        return math.expm1(self.log_total)

    @property
    def drifted(self) -> bool:
        return self.total < -self.bound and self.p_adjusted < ALPHA

    def largest(self, count: int = 3) -> str:
        worst = sorted(self.landings, key=lambda lc: lc[1].log_ratio)[:count]
        return ", ".join(f"{commit[:9]} {math.expm1(c.log_ratio):+.1%}" for commit, c in worst if c.log_ratio < 0)


@dataclass
class Drift:
    chain: list[LedgerEntry]  # oldest first
    trends: list[Trend]
    problems: list[str] = field(default_factory=list)  # the check could not run
    notes: list[str] = field(default_factory=list)

    @property
    def drifted(self) -> list[Trend]:
        return [t for t in self.trends if t.drifted]

    @property
    def exit_code(self) -> int:
        return 2 if self.problems else 1 if self.drifted else 0

    def lines(self) -> list[str]:
        out = [f"PROBLEM: {p}" for p in self.problems] + [f"note: {n}" for n in self.notes]
        if self.chain:
            out.append(f"gate ledger: {len(self.chain)} landing(s) chained, {self.chain[0].reference[:9]}.."
                       f"{self.chain[-1].commit[:9]}")
        for trend in self.trends:
            if trend.cell != "suite" and not trend.drifted:
                continue
            flag = "DRIFTED" if trend.drifted else "ok"
            since = f" since {trend.restarted_after[:9]} (accepted there)" if trend.restarted_after else ""
            out.append(f"{flag}: {trend.tier} {trend.metric} {trend.cell}: {trend.total:+.1%} over "
                       f"{len(trend.landings)} landing(s){since} (bound -{trend.bound:.0%}, one-sided p "
                       f"{trend.p_adjusted:.2g})" + (f"; largest: {trend.largest()}" if trend.drifted else ""))
        return out


def same_code(a: str, b: str, changed: Callable[[str, str], list[str] | None]) -> bool:
    """Two commits with the same code: equal, or differing only in EQUIVALENT paths."""
    if a == b:
        return True
    paths = changed(a, b)
    return paths is not None and all(any(fnmatch.fnmatchcase(p, pat) for pat in EQUIVALENT) for p in paths)


def chain_back(newest: LedgerEntry, entries: list[LedgerEntry],
               changed: Callable[[str, str], list[str] | None]) -> tuple[list[LedgerEntry], str | None]:
    """The chain ending at `newest`, oldest first, and the problem that stopped it early
    (None when it ran out of entries only because the ledger starts there)."""
    chain = [newest]
    pool = [e for e in entries if e is not newest and not same_code(e.commit, newest.commit, changed)]
    while len(chain) < MAX_LANDINGS:
        reference = chain[-1].reference
        before = [e for e in pool if same_code(e.commit, reference, changed)]
        if not before:
            older = [e for e in pool if e not in chain]
            if older and len(chain) == 1:
                return chain[::-1], (f"no ledger entry for the reference {reference[:12]} of {chain[-1].commit[:12]} "
                                     f"(the landing before it did not record its gate in results/gate/)")
            break
        chain.append(max(before, key=lambda e: e.recorded_at))
        pool = [e for e in pool if e not in before]
    return chain[::-1], None


def trends_of(chain: list[LedgerEntry]) -> list[Trend]:
    trends: dict[tuple[str, str, str], Trend] = {}
    for entry in chain:
        accepted = {(a.get("tier"), a.get("metric"), a.get("label") or a.get("cell")) for a in entry.accepted}
        for tier, metrics in entry.changes.items():
            for metric, cells in metrics.items():
                bound_suite, bound_cell = BOUNDS.get((tier, metric), (0.05, 0.10))
                for cell, change in cells.items():
                    key = (tier, metric, cell)
                    trend = trends.setdefault(key, Trend(tier, metric, cell, [], bound_suite if cell == "suite"
                                                         else bound_cell))
                    if (tier, metric, cell) in accepted:  # accepted here: its chain starts after this landing
                        trend.landings, trend.restarted_after = [], entry.commit
                        continue
                    trend.landings.append((entry.commit, change))
    result = [t for t in trends.values() if t.landings]
    by_family: dict[tuple[str, str], list[Trend]] = {}
    for trend in result:
        z = trend.log_total / trend.log_se if trend.log_se > 0 else (-math.inf if trend.log_total < 0 else math.inf)
        trend.p = float(sps.norm.cdf(z))  # one-sided: a slowdown
        if trend.cell != "suite":
            by_family.setdefault((trend.tier, trend.metric), []).append(trend)
        else:
            trend.p_adjusted = trend.p
    for family in by_family.values():
        for trend, adjusted in zip(family, holm([t.p for t in family])):
            trend.p_adjusted = adjusted
    return sorted(result, key=lambda t: (t.tier, t.metric, t.cell != "suite", t.cell))


def drift(newest: LedgerEntry, ledger: list[LedgerEntry],
          changed: Callable[[str, str], list[str] | None]) -> Drift:
    chain, problem = chain_back(newest, ledger, changed)
    result = Drift(chain, trends_of(chain), [problem] if problem else [])
    if len(chain) == 1 and not problem:
        result.notes.append("the ledger starts with this landing: no earlier gate result to chain")
    return result
