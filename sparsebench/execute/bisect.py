"""`sparsebench bisect GOOD BAD`: the first commit of a range that made it slower.

Each commit is installed in a venv of its own (cached: `execute/commits.py`, every one
with the versions of this interpreter's packages, so only sparsebench differs) and
compared with `sparsebench ab`, whose sides each run their own code. The tier is chosen
once, on GOOD against BAD: the counted tier (instructions under callgrind, deterministic)
when the selected cells' instructions moved beyond its threshold there, the time tier
(interleaved rounds) otherwise. Then a binary search over the first-parent commits of
GOOD..BAD, each step comparing the middle commit with GOOD: at most ceil(log2 N) steps for
N commits, plus the first comparison and, for the culprit, one comparison with its parent
that names the functions whose cost changed (as Chromium's Pinpoint and `asv find` do).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..modules import module_command
from .commits import first_parents, git, install_commit, installed_versions, pins, resolve


@dataclass
class Comparison:
    good: str
    other: str
    tier: str
    slower: bool  # the other commit regressed against good in the selected cells
    findings: list[str]
    where: list[str]  # counted: the functions whose cost changed most, per flagged cell
    seconds: float
    payload: dict = field(default_factory=dict)


@dataclass
class Bisection:
    good: str
    bad: str
    commits: list[str]  # GOOD's successors up to BAD, oldest first
    tier: str = ""
    steps: list[Comparison] = field(default_factory=list)
    culprit: str | None = None
    culprit_diff: Comparison | None = None


def commits_between(repo: Path, good: str, bad: str) -> list[str]:
    """The first-parent commits after GOOD up to BAD, oldest first (GOOD must be a first
    parent ancestor of BAD)."""
    chain = first_parents(repo, bad)
    if good not in chain:
        raise UserError(f"bisect: {good[:12]} is not on the first-parent history of {bad[:12]}")
    return chain[:chain.index(good)][::-1]


def subject(repo: Path, commit: str) -> str:
    return git(repo, "show", "-s", "--format=%s", commit).stdout.strip()


# A verdict on one `ab --format json` document of a tier: (slower, what was found, where
# the cost changed). The command line passes `analyze.gate`'s (execute/ does not import analyze/).
Judge = Callable[[str, dict], tuple[bool, list[str], list[str]]]


class Bisector:
    def __init__(self, repo: Path, *, suite: str, cells: tuple[str, ...], overrides: list[str], rounds: int,
                 count_steps: int, work: Path, say: Callable[[str], None], judge: Judge):
        self.repo, self.suite, self.cells, self.overrides = repo, suite, cells, overrides
        self.rounds, self.count_steps, self.work, self.say, self.judge = rounds, count_steps, work, say, judge
        self.constraints = pins(installed_versions(sys.executable))
        self.pythons: dict[str, str] = {}
        self.runs = 0

    def python(self, commit: str) -> str:
        if commit not in self.pythons:
            self.pythons[commit] = install_commit(self.repo, commit, constraints=self.constraints, say=self.say)
        return self.pythons[commit]

    def compare(self, good: str, other: str, tier: str) -> Comparison:
        """`ab` of GOOD (side A) against OTHER (side B) in `tier`."""
        self.runs += 1
        folder = self.work / f"{self.runs:02d}-{tier}-{good[:9]}-{other[:9]}"
        json_file = folder.with_suffix(".json")
        args = ["ab", "--suite", self.suite, *[a for c in self.cells for a in ("--cells", c)],
                *[a for o in self.overrides for a in ("--set", o)],
                "--a-python", self.python(good), "--b-python", self.python(other), "--output", str(folder),
                "--json", str(json_file)]
        args += (["--count", "--count-steps", str(self.count_steps)] if tier == "counted"
                 else ["--rounds", str(self.rounds)])
        t0 = time.monotonic()
        log = folder.with_suffix(".log")
        with open(log, "w") as fh:
            done = subprocess.run(module_command(sys.executable, "sparsebench", *args), stdout=fh, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, cwd=self.work)
        if not json_file.exists():
            lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
            raise UserError(f"bisect: ab of {good[:9]} against {other[:9]} ({tier}) exited {done.returncode} without a "
                            f"verdict: {lines[-1] if lines else 'no output'} (log: {log})")
        payload = json.loads(json_file.read_text())
        slower, findings, where = self.judge(tier, payload)
        return Comparison(good, other, tier, slower, findings, where, time.monotonic() - t0, payload)


def bisect(repo: Path, good_name: str, bad_name: str, *, suite: str, judge: Judge, cells: tuple[str, ...] = (),
           overrides: list[str] | None = None, rounds: int = 6, count_steps: int = 3, work: Path,
           say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
           use_counted: bool = True) -> Bisection:
    good, bad = resolve(repo, good_name), resolve(repo, bad_name)
    for name, commit in ((good_name, good), (bad_name, bad)):
        if commit is None:
            raise UserError(f"bisect: {name!r} is not a commit of {repo}")
    commits = commits_between(repo, good, bad)
    if not commits:
        raise UserError(f"bisect: {bad[:12]} is {good[:12]}: nothing between them")
    work.mkdir(parents=True, exist_ok=True)
    found = Bisection(good, bad, commits)
    say(f"bisect: {len(commits)} commit(s) after {good[:9]} up to {bad[:9]}: at most "
        f"{math.ceil(math.log2(len(commits))) + 2} comparisons")
    bisector = Bisector(repo, suite=suite, cells=cells, overrides=list(overrides or []), rounds=rounds,
                        count_steps=count_steps, work=work, say=say, judge=judge)

    def step(other: str, tier: str, why: str) -> Comparison:
        compared = bisector.compare(good, other, tier)
        found.steps.append(compared)
        verdict = "SLOWER" if compared.slower else "not slower"
        detail = f": {'; '.join(compared.findings[:3])}" if compared.findings else ""
        say(f"step {len(found.steps)} ({why}): {other[:9]} against good {good[:9]}, {tier} tier: {verdict}{detail} "
            f"({compared.seconds:.0f} s)")
        return compared

    tiers = ["counted", "time"] if use_counted else ["time"]
    for tier in tiers:
        first = step(bad, tier, "is BAD slower?")
        if first.slower:
            found.tier = tier
            break
    else:
        raise UserError(f"bisect: {bad[:12]} is not slower than {good[:12]} in the {' or the '.join(tiers)} tier "
                        f"(suite {suite}{', cells ' + ','.join(cells) if cells else ''}): nothing to bisect")
    low, high = -1, len(commits) - 1  # commits[high] is slower; commits[low] (GOOD at -1) is not
    while high - low > 1:
        middle = (low + high) // 2
        if step(commits[middle], found.tier, f"{high - low - 1} candidate(s) left").slower:
            high = middle
        else:
            low = middle
    found.culprit = commits[high]
    parent = commits[high - 1] if high > 0 else good
    if found.tier == "counted":
        compared = bisector.compare(parent, found.culprit, "counted")
        found.culprit_diff = compared
        found.steps.append(compared)
        say(f"step {len(found.steps)} (the culprit against its parent {parent[:9]}): "
            f"{'; '.join(compared.findings[:3]) or 'no cell beyond the threshold'} ({compared.seconds:.0f} s)")
    return found


def render(found: Bisection, repo: Path) -> str:
    lines = [f"first bad commit: {found.culprit} {subject(repo, found.culprit)}",
             f"found with the {found.tier} tier in {len(found.steps)} comparison(s) over {len(found.commits)} commit(s) "
             f"(at most ceil(log2 {len(found.commits)}) + 2 = {math.ceil(math.log2(len(found.commits))) + 2})"]
    for i, c in enumerate(found.steps, start=1):
        lines.append(f"  {i}. {c.good[:9]} vs {c.other[:9]} ({c.tier}): {'SLOWER' if c.slower else 'not slower'}"
                     + (f" - {'; '.join(c.findings[:2])}" if c.findings else ""))
    if found.culprit_diff is not None and found.culprit_diff.where:
        lines.append("where the culprit's cost changed (against its parent):")
        lines += [f"  {w}" for w in found.culprit_diff.where]
    return "\n".join(lines)
