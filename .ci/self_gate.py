"""The project gates itself: this checkout (B) against the commit it was built on (A), each
installed in its own venv with the same third-party versions, in three tiers, then the
drift of the landings before it.

Reference: the commit in `.ci/perf-baseline` (moved to the landed main at the start of
every piece of work) or `SPARSEBENCH_GATE_REFERENCE=COMMIT`. It must be a commit of this
checkout, on HEAD's first-parent history, at most 50 commits behind; a reference that is
missing, breaks a rule or cannot be installed fails the gate with one line, never skips it.

Tiers (each `sparsebench ab`, whose sides each run their own code: `execute/side.py`):
- counted: the `gate` suite under callgrind, instructions per example gated at 1%; and the
  headline fused cell (2^20 x 50, batch 1024), gated on instructions and estimated cycles;
- time: the `gate` suite, interleaved, gated on the suite's geometric mean and on every
  cell (wall and CPU time), and on a slow mode B alone has;
- headline: the `headline` suite (the fused op and the stock lookup at 2^20 x 50, batch
  1024, 2 intra-op threads, huge pages as the default, one process per cell), gated per cell.

A finding fails the gate unless a `perf-accepted:` line of a commit in reference..HEAD
covers it (cells, tier and size: `sparsebench.analyze.gate`); a failed cell, a tier that
compared nothing and a side that runs another TensorFlow always fail.

Drift: the gate's result is written as a ledger entry (`--record DIR`, CI: results/gate/)
and `sparsebench history` chains it with the committed entries of earlier landings; a
cumulative slowdown beyond its bound, or a chain that cannot reach the reference, fails.

Run by `.ci/run` as `python .ci/self_gate.py HEAD_PYTHON --record results/gate`; prints
every stage with its time, the tables, the verdict, and exits 0 (pass) or 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE_FILE = ROOT / ".ci" / "perf-baseline"
REFERENCE_VARIABLE = "SPARSEBENCH_GATE_REFERENCE"
# The timed tiers' suites, rounds and rules: sparsebench.analyze.gate.TIMED_TIERS (their A/A
# false-fail rate is simulated in tests/test_gate_stats.py and measured live, README).
# The counted tier: the gate suite and the headline fused SGD cell in the same workers (one
# valgrind start-up), instructions gated at 1% for every cell, estimated cycles for the
# headline cell only (the gate suite's move up to 3.9% between identical runs).
HEADLINE_CELL = "fused-b1024-sgd-*"
COUNTED = ["--count", "--suite", "gate", "--count-also", f"headline@{HEADLINE_CELL}", "--count-threshold", "1",
           "--cycles-threshold", "2", "--cycles-cells", HEADLINE_CELL]


def say(text: str) -> None:
    print(f"== self-gate: {text}", flush=True)


class Stage:
    """Prints a stage's name, then its duration."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.t0 = time.monotonic()
        say(f"{self.name} ...")
        return self

    def __exit__(self, *exc):
        say(f"{self.name}: {time.monotonic() - self.t0:.0f} s")
        return False


def reference_name() -> tuple[str, str]:
    """(name, where it came from)."""
    override = os.environ.get(REFERENCE_VARIABLE, "").strip()
    if override:
        return override, REFERENCE_VARIABLE
    if not BASELINE_FILE.exists():
        return "", f"{BASELINE_FILE.relative_to(ROOT)} (missing)"
    names = [line.split("#", 1)[0].strip() for line in BASELINE_FILE.read_text().splitlines()]
    return next((n for n in names if n), ""), str(BASELINE_FILE.relative_to(ROOT))


def tiers_to_run(names: str) -> list[str]:
    from sparsebench.analyze.gate import TIERS

    chosen = [t.strip() for t in names.split(",") if t.strip()]
    unknown = [t for t in chosen if t not in TIERS]
    if unknown:
        raise SystemExit(f"self-gate: unknown tier(s) {', '.join(unknown)} (known: {', '.join(TIERS)})")
    return chosen


def run_ab(head_python: str, name: str, args: list[str], folder: Path) -> dict:
    """One `sparsebench ab` (the head's CLI; each side runs its own code); its JSON, or a
    finding-shaped failure when it could not decide."""
    from sparsebench.modules import module_command

    json_file = folder / f"{name}.json"
    command = module_command(head_python, "sparsebench", "ab", *args, "--output", str(folder / name),
                             "--json", str(json_file))
    done = subprocess.run(command, cwd=folder)
    if json_file.exists():
        return json.loads(json_file.read_text())
    return {"error": f"`sparsebench ab {' '.join(args)}` exited {done.returncode} without a verdict "
                     f"(its last lines above say why)"}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python .ci/self_gate.py")
    parser.add_argument("head_python", nargs="?", default=sys.executable)
    parser.add_argument("--record", type=Path, help="write this gate's ledger entry into DIR (CI: results/gate)")
    parser.add_argument("--tiers", default="counted,time,headline", help="comma-separated (default: all three)")
    args = parser.parse_args(argv)

    from sparsebench.analyze.drift import entry_from_reports
    from sparsebench.analyze.gate import TIMED_TIERS, GateVerdict, accept, parse_acceptances, tier_findings
    from sparsebench.errors import UserError
    from sparsebench.execute.commits import check_reference, install_commit, installed_versions, messages, pins

    started = time.monotonic()
    verdict = GateVerdict()
    work = Path(tempfile.mkdtemp(prefix="sparsebench-self-gate-"))
    name, source = reference_name()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    try:
        tiers = tiers_to_run(args.tiers)
        reference = check_reference(ROOT, name, source)
        say(f"reference {reference[:12]} ({source}); this checkout {head[:12] or '?'}; work folder {work}")
        acceptances, problems = parse_acceptances(messages(ROOT, reference))
        verdict.problems += problems
        for acceptance in acceptances:
            say(f"in the gated commits: {acceptance.describe()}")
        with Stage(f"install the reference {reference[:12]} (versions pinned to this checkout's)"):
            base_python = install_commit(ROOT, reference, constraints=pins(installed_versions(args.head_python)),
                                         root=work / "venvs", say=say)
    except UserError as exc:
        say(f"FAIL: {exc}")
        return 1
    sides = ["--a-python", base_python, "--b-python", args.head_python]
    plan = {
        "counted": [("counted", COUNTED)],
        **{tier: [(tier, timed.ab_options())] for tier, timed in TIMED_TIERS.items()},
    }
    reports: dict[str, dict] = {}
    for tier in tiers:
        for run_name, ab_args in plan[tier]:
            with Stage(f"{run_name}: sparsebench ab {' '.join(ab_args)} (A = reference, B = this checkout)"):
                payload = run_ab(args.head_python, run_name, [*ab_args, *sides], work)
            if "error" in payload:
                verdict.problems.append(f"{run_name}: {payload['error']}")
                continue
            reports[run_name] = payload
            verdict.findings += tier_findings(tier, payload)
            tf = [d for d in payload.get("side_differences", []) if d.startswith("TensorFlow version")]
            verdict.problems += [f"{run_name}: the sides run different TensorFlow ({d}): the pinning failed" for d in tf]
    accept(verdict.findings, acceptances)
    for line in verdict.lines():
        say(line)
    accepted = [{"tier": f.tier, "metric": f.metric, "cell": f.cell, "label": f.label, "slowdown": f.slowdown,
                 "by": f.accepted_by.describe()} for f in verdict.accepted]
    host = _host()
    entry = entry_from_reports(reference, head, host, reports, accepted)
    folder = (args.record if args.record is not None else work / "ledger").resolve()
    path = entry.write(folder)
    say(f"ledger entry written: {path}")
    drift_code = 0
    if args.record is not None and set(tiers) == {"counted", "time", "headline"}:
        with Stage(f"drift: sparsebench history {folder}"):
            from sparsebench.modules import module_command

            drift_code = subprocess.run(module_command(args.head_python, "sparsebench", "history", str(folder),
                                                       "--repo", str(ROOT)), cwd=work).returncode
        say("drift: " + {0: "within bounds", 1: "DRIFTED beyond a bound (above)",
                         2: "could not be checked (above)"}.get(drift_code, f"exit {drift_code}"))
    code = 1 if verdict.exit_code or drift_code else 0
    say(f"{'PASS' if code == 0 else 'FAIL'} in {time.monotonic() - started:.0f} s")
    return code


def _host() -> str:
    """The machine the gate measured on, for the ledger (ratios travel between hosts; the
    host says where each was taken)."""
    from sparsebench.machine import cpu_count, cpu_info

    info = cpu_info()
    vector = [f for f in info.get("flags") or [] if f.startswith("avx")]
    return f"{info.get('model') or 'unknown CPU'}, {cpu_count()} cores, {' '.join(vector) or 'no AVX'}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
