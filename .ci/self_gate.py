"""The project gates itself: `sparsebench ab` between the checkout and the baseline commit
named in `.ci/perf-baseline`, each installed in its own venv, on the `gate` suite.

- The counted tier (`ab --count`, callgrind) fails CI on any regression beyond its
  threshold: counts are deterministic, so it has no false alarms to budget for.
- The time tier (interleaved wall and CPU time) fails CI only on a suite-level regression
  at a strict alpha (`--fail-on suite --suite-alpha 0.01`), so spurious failures stay
  below 1 in 100 runs.
- A slowdown someone decided to accept lands with a line `perf-accepted: <reason>` in a
  commit message since the baseline: the tables still print, the step passes, and the
  reason is printed beside them. Every slowdown that lands is then a decision with a reason.

Run by `.ci/run` as `python .ci/self_gate.py HEAD_PYTHON`; it prints what it does, then
the tables, and exits non-zero only on an unaccepted regression. Where the checkout holds
no git history (the baseline cannot be built), it says so and exits 0: there is nothing to
compare against, which is not a regression.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE_FILE = ROOT / ".ci" / "perf-baseline"
ACCEPTED = re.compile(r"^[ \t]*perf-accepted:[ \t]*(\S.*)$", re.MULTILINE)
TIME_ROUNDS = int(os.environ.get("SPARSEBENCH_GATE_ROUNDS", "8"))


def accepted_reason(messages: str) -> str | None:
    """The reason of the last `perf-accepted: reason` line in the commit messages, if any."""
    found = ACCEPTED.findall(messages)
    return found[-1].strip() if found else None


def verdict(tier_exit: int, reason: str | None) -> tuple[int, str]:
    """(exit code, what to say) for one tier's `ab` exit code: 0 passes; 1 (a regression)
    fails unless accepted; anything else (bad input, an interrupted run) always fails."""
    if tier_exit == 0:
        return 0, "no regression"
    if tier_exit == 1 and reason is not None:
        return 0, f"regression ACCEPTED by a commit message: perf-accepted: {reason}"
    if tier_exit == 1:
        return 1, ("REGRESSION: fix it, or accept it with a line 'perf-accepted: <reason>' in the commit message "
                   "(the tables above say which cells and, for counted work, which functions)")
    return tier_exit, f"the gate itself failed (exit {tier_exit})"


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


def _say(text: str) -> None:
    print(f"== self-gate: {text}", flush=True)


def baseline_commit() -> str | None:
    lines = BASELINE_FILE.read_text().splitlines() if BASELINE_FILE.exists() else []
    names = [line.split("#", 1)[0].strip() for line in lines]
    name = next((n for n in names if n), "")
    if not name:
        return None
    found = _git("rev-parse", "--verify", f"{name}^{{commit}}")
    return found.stdout.strip() if found.returncode == 0 else None


def install_baseline(commit: str, folder: Path) -> Path:
    """The baseline commit's tree, installed into a venv of its own; its python."""
    source, venv = folder / "src", folder / "venv"
    source.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(source)], check=True)
    return python


def main(argv: list[str]) -> int:
    head_python = argv[0] if argv else sys.executable
    commit = baseline_commit()
    if commit is None:
        _say(f"skipped: the baseline named in {BASELINE_FILE.relative_to(ROOT)} is not in this checkout "
             f"(no git history?): nothing to compare against")
        return 0
    messages = _git("log", "--format=%B", f"{commit}..HEAD").stdout
    reason = accepted_reason(messages)
    work = Path(tempfile.mkdtemp(prefix="sparsebench-self-gate-"))
    _say(f"baseline {commit[:12]} ({BASELINE_FILE.relative_to(ROOT)}) installing into {work / 'venv'}")
    base_python = install_baseline(commit, work)
    sides = ["--a-python", str(base_python), "--b-python", head_python]
    worst = 0
    for tier, extra in (("counted", ["--count"]),
                        ("time", ["--rounds", str(TIME_ROUNDS), "--fail-on", "suite", "--suite-alpha", "0.01"])):
        _say(f"{tier} tier: sparsebench ab --suite gate {' '.join(extra)} (A = baseline, B = this checkout)")
        done = subprocess.run([head_python, "-m", "sparsebench", "ab", "--suite", "gate", *sides, *extra,
                               "--output", str(work / tier)])
        code, words = verdict(done.returncode, reason)
        _say(f"{tier} tier: {words}")
        worst = max(worst, code)
    return worst


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
