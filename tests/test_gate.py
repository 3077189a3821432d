"""The self-gate's rules: its reference, what accepts a slowdown, what a tier's findings mean,
the drift of the landings before it, and what ab says about the two sides (no timing here:
the tiers' JSON and the ledger entries are written by hand)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsebench.analyze.drift import Change, LedgerEntry, drift, entry_from_reports, read_entry
from sparsebench.analyze.gate import GateVerdict, accept, parse_acceptances, tier_findings
from sparsebench.errors import UserError
from sparsebench.execute.commits import check_reference, first_parents, messages
from sparsebench.machine import side_differences

ROOT = Path(__file__).resolve().parent.parent


def _git(repo, *args):
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True,
                          env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                               "GIT_COMMITTER_EMAIL": "t@t"})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture
def repo(tmp_path):
    """A linear history of 55 commits, and one commit on a side branch."""
    path = tmp_path / "repo"
    path.mkdir()
    _git(path, "init", "-q", "-b", "main")
    for i in range(55):
        _git(path, "commit", "-q", "--allow-empty", "-m", f"commit {i}")
    _git(path, "checkout", "-q", "-b", "side", "HEAD~3")
    _git(path, "commit", "-q", "--allow-empty", "-m", "on a side branch")
    side = _git(path, "rev-parse", "HEAD")
    _git(path, "checkout", "-q", "main")
    return path, side


# -- the reference -----------------------------------------------------------------------------
def test_a_reference_must_be_a_recent_first_parent_ancestor(repo):
    path, side = repo
    chain = first_parents(path)
    assert check_reference(path, chain[1], "test") == chain[1]
    assert check_reference(path, chain[50][:10], "test") == chain[50]  # a short name resolves
    with pytest.raises(UserError, match="is not a commit of this checkout"):
        check_reference(path, "0123456789abcdef0123456789abcdef01234567", "test")
    with pytest.raises(UserError, match="not a commit of this checkout"):
        check_reference(path, "--output=/tmp/x", "test")  # never an option to git
    with pytest.raises(UserError, match="not on HEAD's first-parent history"):
        check_reference(path, side, "test")
    with pytest.raises(UserError, match="51 commits behind HEAD, more than 50"):
        check_reference(path, chain[51], "test")


def _self_gate(reference: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPARSEBENCH_GATE_REFERENCE": reference, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / ".ci" / "self_gate.py"), sys.executable, "--tiers", "counted"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="this checkout has no git history")
def test_the_self_gate_fails_with_one_line_for_each_broken_reference_rule(tmp_path):
    chain = first_parents(ROOT)
    side = subprocess.run(["git", "commit-tree", "HEAD^{tree}", "-m", "not on main"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                                          "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}).stdout.strip()
    cases = [("feedfacefeedfacefeedfacefeedfacefeedface", "is not a commit of this checkout"),
             (side, "is not on HEAD's first-parent history"),
             (chain[51] if len(chain) > 51 else None, "51 commits behind HEAD")]
    for reference, said in cases:
        if reference is None:
            continue
        done = _self_gate(reference, tmp_path)
        failing = [line for line in done.stdout.splitlines() if "FAIL" in line]
        assert done.returncode == 1 and len(failing) == 1 and said in failing[0], done.stdout + done.stderr
        assert "Traceback" not in done.stderr


# -- acceptance --------------------------------------------------------------------------------
def test_acceptance_lines_are_parsed_and_a_malformed_one_is_a_problem():
    found, problems = parse_acceptances([
        ("a" * 40, "Faster\n\nperf-accepted: cells=fused-* max=8% tier=time reason=the copy fixes a race (#42)\n"),
        ("b" * 40, "perf-accepted: the old form, a reason only\n"),
        ("c" * 40, "perf-accepted: cells=* max=120% tier=time reason=too much\n"),
        ("d" * 40, "text that mentions perf-accepted: inside a line does not count\n"),
    ])
    assert [(a.cells, a.max_slowdown, a.tier, a.reason) for a in found] == [
        ("fused-*", pytest.approx(0.08), "time", "the copy fixes a race (#42)")]
    assert len(problems) == 2 and "bbbbbbbbbbbb" in problems[0] and "no cells, max, tier" in problems[0]
    assert "between 0 and 100" in problems[1]


def _tier(cells, suite=None, metric="wall"):
    return {"metric": metric, "gated": True, "cells": cells, "suite": suite}


def _cell(cell_id, status, ratio=None, note="", slow_mode=False):
    return {"cell_id": cell_id, "status": status, "ratio": ratio, "note": note, "slow_mode": slow_mode,
            "log_se": 0.01}


def test_an_acceptance_covers_its_cells_tier_and_size_only():
    found, _ = parse_acceptances([("a" * 40, "perf-accepted: cells=fused-* max=8% tier=time reason=r\n")])
    payload = _tier([_cell("fused-b512-sgd-cpu-1234abcd", "regressed", 0.93),
                     _cell("els-b512-sgd-cpu-5678abcd", "regressed", 0.93),
                     _cell("fused-b512-lazy_adam-cpu-9abc1234", "regressed", 0.88),
                     _cell("fused-b512-ftrl-cpu-0000aaaa", "failed", note="B failed in round(s) 1")])
    verdict = GateVerdict(accept(tier_findings("time", payload), found))
    accepted = {f.cell for f in verdict.accepted}
    failing = {f.cell for f in verdict.failing}
    assert accepted == {"fused-b512-sgd-cpu-1234abcd"}  # within 8%, a fused cell, the time tier
    assert failing == {"els-b512-sgd-cpu-5678abcd",  # not a fused cell
                       "fused-b512-lazy_adam-cpu-9abc1234",  # 12% is beyond the 8% accepted
                       "fused-b512-ftrl-cpu-0000aaaa"}  # a failed cell is never accepted
    headline = GateVerdict(accept(tier_findings("headline", _tier([_cell("fused-b1024-sgd-x-1", "regressed", 0.95)])),
                                  found))
    assert headline.exit_code == 1  # another tier
    assert any("ACCEPTED by perf-accepted in aaaaaaaaaaaa" in line for line in verdict.lines())


def test_an_acceptance_in_an_older_commit_outside_the_gated_range_accepts_nothing(repo):
    path, _ = repo
    _git(path, "commit", "-q", "--allow-empty", "-m", "slower\n\nperf-accepted: cells=* max=50% tier=any reason=old")
    reference = _git(path, "rev-parse", "HEAD")  # the landed main: the acceptance is in it
    _git(path, "commit", "-q", "--allow-empty", "-m", "the change being gated")
    found, problems = parse_acceptances(messages(path, reference))
    assert found == [] and problems == []
    verdict = GateVerdict(accept(tier_findings("time", _tier([_cell("els-b512-sgd-cpu-1", "regressed", 0.7)])), found))
    assert verdict.exit_code == 1
    inside, _ = parse_acceptances(messages(path, _git(path, "rev-parse", "HEAD~2")))
    assert [a.reason for a in inside] == ["old"]  # from one commit further back it is in the range


def test_a_tier_that_compared_nothing_fails_and_a_regressed_suite_is_a_finding():
    nothing = tier_findings("counted", _tier([_cell("c1", "not compared", note="A ok, B skipped"),
                                                _cell("c2", "not compared")], metric="instructions"))
    assert [f.kind for f in nothing] == ["nothing compared"] and GateVerdict(nothing).exit_code == 1
    suite = tier_findings("time", _tier([_cell("c1", "unchanged", 0.99)],
                                        {"status": "regressed", "ratio": 0.97, "cells": 1, "log_se": 0.005}))
    assert [(f.cell, f.kind) for f in suite] == [("suite", "regressed")]
    found, _ = parse_acceptances([("a" * 40, "perf-accepted: cells=suite max=4% tier=time reason=r\n")])
    assert GateVerdict(accept(suite, found)).exit_code == 0
    quiet = tier_findings("counted", {**_tier([_cell("c1", "regressed", 0.9)], metric="cycles"), "gated": False})
    assert quiet == []  # shown, not gated


def test_a_slow_mode_is_a_finding_of_its_own_kind():
    found = tier_findings("headline", _tier([_cell("fused-b1024-sgd-x-1", "regressed", 0.97, "SLOW MODE: ...", True)]))
    assert [f.kind for f in found] == ["slow mode"] and "SLOW MODE" in found[0].text


# -- the ledger and its drift --------------------------------------------------------------------
def _entry(reference, commit, change, se=0.01, accepted=(), when="2026-12-07T10:00:00+0000"):
    return LedgerEntry(reference, commit, when, "test host",
                       {"time": {"wall": {"suite": Change(math.log(change), se), "c1": Change(math.log(change), se)}}},
                       list(accepted))


def _same(a, b):
    return []  # every pair of commits differs only in the ledger (same code)


def _different(a, b):
    return ["sparsebench/x.py"]


def test_small_slowdowns_that_each_passed_add_up_to_a_drift_naming_the_landings():
    entries = [_entry(f"c{i}", f"c{i + 1}", 0.985, se=0.004, when=f"2026-12-0{i + 1}T10:00:00+0000") for i in range(5)]
    found = drift(entries[-1], entries, lambda a, b: [] if a == b else ["code"])
    assert [e.commit for e in found.chain] == ["c1", "c2", "c3", "c4", "c5"]
    suite = next(t for t in found.trends if t.cell == "suite")
    assert suite.total == pytest.approx(0.985 ** 5 - 1) and suite.drifted
    assert found.exit_code == 1 and any("DRIFTED: time wall suite: -7.3% over 5 landing(s)" in line
                                        for line in found.lines())
    three = drift(entries[2], entries[:3], lambda a, b: [] if a == b else ["code"])
    assert three.exit_code == 0  # -4.4%: within the 5% bound
    noisy = [_entry(f"c{i}", f"c{i + 1}", 0.985, se=0.05) for i in range(5)]
    assert drift(noisy[-1], noisy, lambda a, b: [] if a == b else ["code"]).exit_code == 0  # -7.3% in noise of 11%


def test_an_accepted_slowdown_starts_its_cells_chain_afresh():
    accepted = [{"tier": "time", "metric": "wall", "cell": "suite", "label": "suite", "slowdown": 0.06, "by": "x"},
                {"tier": "time", "metric": "wall", "cell": "c1", "label": "c1", "slowdown": 0.06, "by": "x"}]
    entries = [_entry("c0", "c1", 0.985, se=0.004), _entry("c1", "c2", 0.94, se=0.004, accepted=accepted),
               _entry("c2", "c3", 0.985, se=0.004), _entry("c3", "c4", 0.985, se=0.004)]
    found = drift(entries[-1], entries, lambda a, b: [] if a == b else ["code"])
    suite = next(t for t in found.trends if t.cell == "suite")
    assert len(suite.landings) == 2 and suite.restarted_after == "c2" and found.exit_code == 0


def test_a_chain_that_cannot_reach_the_newest_reference_could_not_be_checked():
    entries = [_entry("c0", "c1", 1.0), _entry("c5", "c6", 1.0)]
    found = drift(entries[1], entries, lambda a, b: [] if a == b else ["code"])
    assert found.exit_code == 2 and "no ledger entry for the reference c5" in found.problems[0]
    alone = drift(entries[1], [entries[1]], _different)
    assert alone.exit_code == 0 and "starts with this landing" in alone.notes[0]


def test_an_entry_and_a_later_commit_with_the_same_code_chain():
    """The landing's entry names the commit that was gated; the landed main adds the entry
    itself (results/gate/): the next reference differs from it only there."""
    entries = [_entry("c0", "c1", 0.99), _entry("c1-plus-ledger", "c2", 0.99)]

    def changed(a, b):
        if a == b:
            return []
        return ["results/gate/c1.json", "README.md"] if {a, b} == {"c1", "c1-plus-ledger"} else ["sparsebench/x.py"]

    found = drift(entries[1], entries, changed)
    assert len(found.chain) == 2 and found.problems == []
    code = [_entry("c0", "c1", 0.99), _entry("c1-plus-code", "c2", 0.99)]
    assert drift(code[1], code, changed).exit_code == 2  # a code change in between breaks the chain


def test_a_ledger_entry_round_trips_and_is_built_from_tier_reports(tmp_path):
    payload = {**_tier([_cell("els-b512-sgd-cpu-1a2b3c4d", "unchanged", 0.99)],
                       {"status": "unchanged", "ratio": 0.995, "log_se": 0.004, "cells": 1}),
               "cpu": _tier([_cell("els-b512-sgd-cpu-1a2b3c4d", "unchanged", 0.98)], metric="cpu")}
    entry = entry_from_reports("a" * 40, "b" * 40, "host", {"time": payload}, [])
    assert set(entry.changes["time"]) == {"wall", "cpu"}
    assert entry.changes["time"]["wall"]["els-b512-sgd-cpu"].log_ratio == pytest.approx(math.log(0.99))
    assert entry.changes["time"]["wall"]["suite"].log_se == pytest.approx(0.004)
    path = entry.write(tmp_path)
    assert path.name == "bbbbbbbbbbbb.json" and read_entry(path).changes == entry.changes
    (tmp_path / "bad.json").write_text(json.dumps({"schema": "sparsebench-gate-ledger", "version": 1}))
    with pytest.raises(UserError, match="damaged gate ledger entry"):
        read_entry(tmp_path / "bad.json")


# -- what differs between the two sides ----------------------------------------------------------
def test_side_differences_name_every_fact_that_reaches_a_worker():
    a = {"environment": {"python": "3.11.7", "tensorflow": {"version": "2.21.0", "build": {"cpu_compiler": "x"}},
                         "worker_variables": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}},
         "run": {"custom_op": {"flags": ["-O3", "-march=native"], "target": "native"}}}
    b = json.loads(json.dumps(a))
    assert side_differences(a, b) == []
    b["environment"]["worker_variables"] = {}
    b["environment"]["tensorflow"]["version"] = "2.20.0"
    b["run"]["custom_op"]["flags"] = ["-O2"]
    lines = side_differences(a, b)
    assert lines == ["TensorFlow version: A '2.21.0', B '2.20.0'",
                     "worker variables: GLIBC_TUNABLES: A 'glibc.malloc.hugetlb=1', B '(unset)'",
                     "fused op build flags: A ['-O3', '-march=native'], B ['-O2']"]


def test_a_full_size_ledger_entry_is_found_whatever_its_key_order(tmp_path):
    """A real entry's keys are sorted: its many changes come before "schema" (a 200-character
    prefix check missed every real entry, and CI's drift stage found no ledger)."""
    from sparsebench.analyze.drift import SCHEMA, entries_in

    changes = {"time": {"wall": {f"cell-{i:02d}": {"log_ratio": 0.001 * i, "log_se": 0.02} for i in range(40)}}}
    entry = {"accepted": [], "changes": changes, "commit": "a" * 40, "reference": "b" * 40, "schema": SCHEMA,
             "version": 1}
    (tmp_path / "aaaaaaaaaaaa.json").write_text(json.dumps(entry, sort_keys=True, indent=1))
    (tmp_path / "other.json").write_text(json.dumps({"schema": "something else"}))
    (tmp_path / "broken.json").write_text("{not json")
    assert entries_in([tmp_path]) == [tmp_path / "aaaaaaaaaaaa.json"]
