"""`sparsebench ab` and `run --processes` end to end on the tiny suite (real workers)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsebench.execute.ab import abba_order
from sparsebench.execute.runner import plan_rounds
from sparsebench.plan.suite import load_suite
from sparsebench.results import read_results

pytestmark = pytest.mark.slow

TINY = Path(__file__).parent / "fixtures" / "tiny.toml"
ROOT = Path(__file__).resolve().parent.parent


def cli(*args, check=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "sparsebench", *args], capture_output=True, text=True, env=env)
    if check is not None:
        assert done.returncode == check, done.stdout + done.stderr
    return done


def test_abba_order():
    assert [side for _, side in abba_order(4)] == list("ABBAABBA")
    assert [r for r, _ in abba_order(2)] == [1, 1, 2, 2]


def test_rounds_measure_every_cell_before_the_next_round():
    suite = load_suite(str(TINY))
    suite.override("processes=3")
    cells = suite.cells()
    schedule = plan_rounds(cells)
    assert [(r, [c.cell_id for c in cs]) for r, cs in schedule] == [(r, [c.cell_id for c in cells]) for r in (1, 2, 3)]
    done = {(cells[0].cell_id, 1), (cells[0].cell_id, 2), (cells[1].cell_id, 1)}
    assert [(r, [c.cell_id for c in cs]) for r, cs in plan_rounds(cells, done)] == [
        (2, [cells[1].cell_id]), (3, [c.cell_id for c in cells])]


def test_run_with_processes_interleaves_rounds_and_merges_them(tmp_path):
    out = tmp_path / "r.jsonl"
    done = cli("run", "--suite", str(TINY), "--processes", "2", "--output", str(out), check=0)
    assert "4 cell processes (2 per cell) run: 4 ok" in done.stdout and "(process 2/2)" in done.stdout
    results = read_results(out)
    order = [(r.cell_id.split("-")[0], r.round) for r in results.records]
    assert order == [("els", 1), ("sdm", 1), ("els", 2), ("sdm", 2)]
    assert len({r.worker["pid"] for r in results.records}) == 4  # a fresh process each time
    for merged in results.latest():
        assert merged.processes == 2 and merged.run_to_run_measured is True
        assert len(merged.process_windows) == 2 and merged.between_process_cv is not None
    matrix = cli("report", str(out), check=0).stdout
    assert "†" not in matrix.split("\n\n")[1]  # no one-process mark on these rows


def test_ab_takes_turns_cell_by_cell_in_abba_order_and_pairs_each_round(tmp_path):
    folder = tmp_path / "ab"
    done = cli("ab", "--suite", str(TINY), "--rounds", "2", "--b-set", "intra_op_threads=1", "--format", "json",
               "--output", str(folder))
    assert done.returncode in (0, 1), done.stderr  # a verdict either way; the order and pairing are what is tested
    payload = json.loads(done.stdout)
    assert payload["names"] == ["A", "B"] and len(payload["cells"]) == 2
    for c in payload["cells"]:
        assert c["unit"] == "rounds" and c["samples"] == [2, 2]
        assert " vs " in c["cell_id"] and "t1x0" in c["cell_id"]  # B's cells differ by their thread setting
    a, b = read_results(folder / "a.jsonl"), read_results(folder / "b.jsonl")
    assert a.header["run"]["ab"]["interleave"] == "cell" and b.header["run"]["ab"]["overrides"] == ["intra_op_threads=1"]
    assert all(r.threads_in_effect["intra_op_threads"] == 1 for r in b.records)
    # Who ran first, per round and cell: A B / B A in round 1, B A / A B in round 2.
    a_ids, b_ids = list(a.by_round()), list(b.by_round())
    order = []
    for r in (1, 2):
        for i in (0, 1):
            first = a.by_round()[a_ids[i]][r].recorded_at < b.by_round()[b_ids[i]][r].recorded_at
            order.append("AB" if first else "BA")
    assert order == ["AB", "BA", "BA", "AB"]
    # The pairing: each round's own A and B.
    first = payload["cells"][0]
    a_rounds = [a.by_round()[a_ids[0]][r].samples_per_sec for r in (1, 2)]
    assert first["baseline"] == pytest.approx(sum(a_rounds) / 2)
    # Fresh workers every round (the tiny suite's isolation is "cell": one per cell and round).
    assert len({rec.worker["pid"] for rec in a.records}) == 4


def test_ab_whole_suite_rounds_run_in_abba_order(tmp_path):
    folder = tmp_path / "ab"
    done = cli("ab", "--suite", str(TINY), "--rounds", "2", "--interleave", "suite", "--format", "json",
               "--set", "variant=embedding_lookup_sparse", "--output", str(folder))
    assert done.returncode in (0, 1), done.stderr
    progress = [line for line in done.stderr.splitlines() if line.startswith("round ")]
    assert [line.split()[3].rstrip(":") for line in progress] == ["A", "B", "B", "A"]
    payload = json.loads(done.stdout)
    assert len(payload["cells"]) == 1 and payload["cells"][0]["samples"] == [2, 2]
    assert any("A/A run" in note for note in payload["notes"])  # identical sides: the noise floor is reported


def test_ab_fails_when_side_b_fails_every_cell(tmp_path):
    """The CI gate whose head crashes must fail: exit 1, the failed cell named."""
    done = cli("ab", "--suite", str(TINY), "--rounds", "2", "--set", "variant=embedding_lookup_sparse",
               "--b-set", "batch_size=99999999999999999", "--output", str(tmp_path / "ab"), check=1)
    last = done.stdout.strip().splitlines()[-1]
    assert "1 FAILED in B: els-b32" in last and "FAILED" in done.stdout and "B failed in round(s) 1, 2" in done.stdout


@pytest.mark.parametrize("args,message", [
    (["--b-set", "batch_size=32,64"], "side A expands to 2 cells and side B to 4"),
    (["--a-python", "/nonexistent/python"], "/nonexistent/python: no such Python interpreter"),
    (["--rounds", "1"], "Invalid value for '--rounds'"),
])
def test_ab_bad_input_is_one_line(tmp_path, args, message):
    done = cli("ab", "--suite", str(TINY), "--output", str(tmp_path / "ab"), *args, check=2)
    assert message in done.stderr and "Traceback" not in done.stderr


def test_a_kill_9_of_ab_takes_its_probe_with_it(tmp_path):
    """Side B's interpreter is a stand-in whose TensorFlow probe would run for a minute:
    once `ab` is killed with SIGKILL, the probe must die with it (parent-death signal)."""
    import signal
    import time

    import psutil

    marker = tmp_path / "probe.pid"
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\n"
                    'case "$*" in\n'
                    '  *--version*) echo "sparsebench 0.2.0"; exit 0;;\n'
                    '  *--protocol*) echo 1; exit 0;;\n'
                    f'  *--probe*) echo $$ > {marker}; exec sleep 120;;\n'
                    "esac\n"
                    f'exec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ab = subprocess.Popen([sys.executable, "-m", "sparsebench", "ab", "--suite", str(TINY), "--b-python", str(fake),
                           "--output", str(tmp_path / "ab")], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not (marker.exists() and marker.read_text().strip()) and ab.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    if not marker.exists():
        ab.kill()
        pytest.fail(f"the probe never started; ab said: {ab.communicate()[0]}")
    probe = psutil.Process(int(marker.read_text()))
    ab.send_signal(signal.SIGKILL)
    ab.wait()
    try:
        probe.wait(timeout=30)
    except psutil.TimeoutExpired:
        probe.kill()
        pytest.fail("the probe outlived the killed ab")


@pytest.mark.skipif(__import__("shutil").which("valgrind") is None, reason="valgrind is not installed")
def test_ab_count_counts_both_sides_and_an_a_a_run_changes_nothing(tmp_path):
    """The counted tier end to end on the tiny suite: both sides under callgrind, every cell
    counted, instructions per example equal to well within the 1% threshold."""
    done = cli("ab", "--count", "--suite", str(TINY), "--count-steps", "3", "--format", "json",
               "--output", str(tmp_path / "ab"), check=0)
    payload = json.loads(done.stdout)
    assert payload["metric"] == "instructions" and payload["cycles"]["metric"] == "cycles"
    assert [c["status"] for c in payload["cells"]] == ["unchanged", "unchanged"]
    assert all(abs(c["ratio"] - 1) < 0.01 for c in payload["cells"])
    records = read_results(tmp_path / "ab" / "a-count.jsonl").records
    assert all(r.counted_steps == 3 and r.instructions_per_example > 0 and r.count_functions for r in records)
    assert all(r.threads_in_effect["intra_op_threads_resolved"] == 1 for r in records)


def test_workers_name_their_features_and_an_older_worker_is_not_waited_for(tmp_path):
    """A worker says it writes `ready` (after importing TensorFlow, before its first cell);
    ab's first cell of a round waits for it, but not for an older worker that never will
    (else every round of an A/B against an older version would wait READY_WAIT_S)."""
    import threading
    import time

    from sparsebench.execute.ab import worker_protocol
    from sparsebench.execute.orchestrator import Orchestrator

    protocol, features = worker_protocol(sys.executable)
    assert protocol == "1" and "ready" in features
    old = tmp_path / "python"
    old.write_text("#!/bin/sh\necho 1\n")
    old.chmod(0o755)
    assert worker_protocol(str(old)) == ("1", set())

    seen = []
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        for announces in (False, True):
            folder = tmp_path / f"w{announces}"
            folder.mkdir()
            orchestrator = Orchestrator(record=lambda outcome: None, announces_ready=announces,
                                        on_ready=lambda folder=folder: seen.append((folder / "ready").exists()))
            orchestrator._process = sleeper
            writer = threading.Timer(1.0, lambda folder=folder: (folder / "ready").write_text("1"))
            writer.start()
            orchestrator._wait_ready(folder)
            writer.join()
    finally:
        sleeper.kill()
    assert seen == [False, True]  # the older worker's first cell went at once; the new one's after `ready`


def test_a_sides_worker_imports_its_own_sparsebench_not_the_current_directorys(tmp_path, monkeypatch):
    """`python -m` puts the current directory first on sys.path: `ab` run in a checkout ran
    the checkout's code on both sides, and a slowdown planted in side B's venv went unseen.
    Here the current directory holds a sparsebench whose worker answers WRONG."""
    from sparsebench.execute.ab import worker_protocol
    from sparsebench.modules import module_command

    fake = tmp_path / "sparsebench" / "train"
    fake.mkdir(parents=True)
    for init in (tmp_path / "sparsebench" / "__init__.py", fake / "__init__.py"):
        init.write_text("")
    (fake / "worker.py").write_text("print('WRONG')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    plain = subprocess.run([sys.executable, "-m", "sparsebench.train.worker", "--protocol"], cwd=tmp_path,
                           capture_output=True, text=True, env=env)
    assert plain.stdout.strip() == "WRONG"  # what `-m` does: the reason for module_command
    ours = subprocess.run(module_command(sys.executable, "sparsebench.train.worker", "--protocol"), cwd=tmp_path,
                          capture_output=True, text=True, env=env)
    assert ours.stdout.splitlines()[0] == "1", ours.stdout + ours.stderr
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    assert worker_protocol(sys.executable)[0] == "1"
