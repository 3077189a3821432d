"""`sparsebench ab` and `run --processes` end to end on the tiny suite (real workers)."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from sparsebench.execute.ab import abba_order
from sparsebench.execute.runner import plan_rounds
from sparsebench.plan.suite import load_suite
from sparsebench.results import read_results

pytestmark = pytest.mark.slow

TINY = Path(__file__).parent / "fixtures" / "tiny.toml"
ROOT = Path(__file__).resolve().parent.parent


def elsewhere(tmp_path: Path) -> Path:
    """A directory holding a `sparsebench` package that refuses to be imported: `ab` runs
    from it in every test here, so any side command started with `python -m` from the
    current directory (which puts that directory first on sys.path) fails the test."""
    fake = tmp_path / "elsewhere" / "sparsebench"
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "__init__.py").write_text("raise SystemExit('IMPORTED the fake sparsebench of the current directory')\n")
    return fake.parent


def cli(*args, check=None, cwd=None):
    """`sparsebench ARGS` (the checkout's code, first on PYTHONPATH) run from a directory
    with a fake sparsebench in it."""
    from sparsebench.modules import module_command

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(module_command(sys.executable, "sparsebench", *args), capture_output=True, text=True, env=env,
                          cwd=cwd or elsewhere(Path(tempfile.mkdtemp(prefix="sparsebench-cwd-"))))
    assert "IMPORTED the fake" not in done.stdout + done.stderr + _logs(args)
    if check is not None:
        assert done.returncode == check, done.stdout + done.stderr
    return done


def _logs(args) -> str:
    """Every log an A/B run left in its --output folder (side servers, rounds, workers)."""
    if "--output" not in args:
        return ""
    folder = Path(args[list(args).index("--output") + 1])
    return "".join(p.read_text(errors="replace") for p in folder.rglob("*.log")) if folder.exists() else ""


def test_abba_order():
    assert [side for _, side in abba_order(4)] == list("ABBAABBA")
    assert [r for r, _ in abba_order(2)] == [1, 1, 2, 2]


@pytest.mark.parametrize("turns", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("isolation", ["cell", "env"])
def test_lockstep_times_one_side_at_a_time_in_turn_order_and_never_stalls(turns, isolation):
    """Both sides as the side servers behave, with random durations and some cells failing
    while they prepare: while a side is timed (warm-up, windows, bound; an older side's
    whole cell), the other is parked at a gate or done; the timed turns follow cell_order;
    every cell ends."""
    import random

    from sparsebench.execute.ab import ANSWERS, Lockstep, cell_order

    rng = random.Random(hash((turns, isolation)) & 0xFFFF)
    cells = 4
    for r in (1, 2, 3):
        sides = dict(zip("AB", turns))
        lockstep = Lockstep(cell_order(cells, r), sides)
        # each side's script: (ask or None, activity) per step; an activity runs until its time is up
        scripts, failed = {}, set()
        for name, takes in sides.items():
            steps = []
            for i in range(cells):
                if takes and (isolation == "cell" or i == 0):
                    steps.append(("want-spawn", "starting", i))
                steps.append(("want", "preparing" if takes else "timed", i))
                if takes and rng.random() < 0.2:
                    failed.add((i, name))  # fails while preparing: never asks to be timed
                elif takes:
                    steps.append(("want-time", "timed", i))
                steps.append((None, "done", i))
            scripts[name] = steps
        state = {name: {"step": 0, "busy": None, "until": 0.0} for name in sides}
        clock, timed_order = 0.0, []
        for _ in range(10000):
            moved = True
            while moved:  # each idle side asks at its next gate, ends its cell, or finishes
                moved = False
                for name, st in state.items():
                    if st["busy"] is None and st["step"] < len(scripts[name]):
                        ask, _, i = scripts[name][st["step"]]
                        if ask is None:
                            lockstep.done(name, i)
                            st["step"] += 1
                            moved = True
                        elif st.get("asked") != st["step"]:
                            lockstep.ask(name, ANSWERS[ask], i)
                            st["asked"] = st["step"]
                    elif st["step"] >= len(scripts[name]) and not lockstep.finished[name]:
                        lockstep.finish(name)
            granted = lockstep.release()
            while granted is not None:
                name, kind, i = granted
                _, activity, _ = scripts[name][state[name]["step"]]
                state[name].update(busy=activity, until=clock + rng.uniform(0.5, 3.0))
                state[name]["step"] += 1
                if activity == "timed":
                    timed_order.append((i, name))
                granted = lockstep.release()
            for name, st in state.items():  # never anything else while the other side is timed
                other = "B" if name == "A" else "A"
                if st["busy"] == "timed":
                    assert state[other]["busy"] is None, (name, other, state)
            if all(lockstep.finished.values()):
                break
            busy = [st for st in state.values() if st["busy"] is not None]
            assert busy, f"stalled: {state}, waiting {lockstep.waiting}"
            first = min(busy, key=lambda st: st["until"])
            clock = first["until"]
            first["busy"] = None
        assert all(lockstep.finished.values())
        assert timed_order == [turn for turn in cell_order(cells, r) if turn not in failed]


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


def wrapper(tmp_path: Path, name: str, exports: str) -> Path:
    """An interpreter that is a shell script exporting `exports` and exec-ing Python (as a
    pyenv shim is, or a wrapper that changes what every worker gets)."""
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\n{exports}\nexec {sys.executable} \"$@\"\n")
    path.chmod(0o755)
    return path


def test_ab_takes_turns_cell_by_cell_in_abba_order_and_pairs_each_round(tmp_path):
    """Side B is a wrapper that turns huge pages off for its workers, and its sparsebench
    is a copy whose side server is gone (as in one from before it): the side server shipped with
    this sparsebench runs against that copy, whose own orchestrator passes the variable on
    to its workers; the report names the difference and how B's side ran."""
    import shutil

    folder = tmp_path / "ab"
    older = tmp_path / "older"
    shutil.copytree(ROOT / "sparsebench", older / "sparsebench", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "suites", older / "suites")  # a source checkout's layout (an editable install hides its absence)
    (older / "sparsebench" / "execute" / "side.py").write_text('PROTOCOL = "0"  # before the side server\n')
    init = older / "sparsebench" / "__init__.py"
    init.write_text(init.read_text().replace("__version__ = ", "__version__ = '0.0.0+older'  # "))
    b_python = wrapper(tmp_path, "python-no-huge-pages",
                       f"export GLIBC_TUNABLES=glibc.malloc.hugetlb=0 PYTHONPATH={older}")
    done = cli("ab", "--suite", str(TINY), "--rounds", "2", "--b-set", "intra_op_threads=1", "--format", "json",
               "--b-python", str(b_python), "--output", str(folder))
    assert done.returncode in (0, 1), done.stderr  # a verdict either way; the order and pairing are what is tested
    payload = json.loads(done.stdout)
    assert any(d.startswith("worker variables: GLIBC_TUNABLES: A 'glibc.malloc.hugetlb=1', B 'glibc.malloc.hugetlb=0'")
               for d in payload["side_differences"]), payload["side_differences"]
    assert any("side B's sparsebench predates the side server" in n for n in payload["notes"])
    b_header = read_results(folder / "b.jsonl").header
    assert b_header["run"]["sparsebench_version"] == "0.0.0+older"  # B's header: written by B's own code
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


def older_sparsebench(tmp_path: Path) -> Path:
    """An interpreter whose sparsebench has no side server (as one from before it): its
    side-protocol probe fails; everything else runs the real interpreter."""
    old = tmp_path / "old-python"
    old.write_text("#!/bin/sh\n"
                   'case "$*" in *sparsebench.execute.side*|*sparsebench/execute/side.py*) '
                   'echo "No module named sparsebench.execute.side" >&2; exit 1;; esac\n'
                   f'exec {sys.executable} "$@"\n')
    old.chmod(0o755)
    return old


def test_ab_against_an_older_side_runs_whole_suite_rounds_in_abba_order(tmp_path):
    """A side without a side server: each side and round is that side's own `run`."""
    folder = tmp_path / "ab"
    done = cli("ab", "--suite", str(TINY), "--rounds", "2", "--a-python", str(older_sparsebench(tmp_path)),
               "--format", "json", "--set", "variant=embedding_lookup_sparse", "--output", str(folder))
    assert done.returncode in (0, 1), done.stderr
    progress = [line for line in done.stderr.splitlines() if line.startswith("round ")]
    assert [line.split()[3].rstrip(":") for line in progress] == ["A", "B", "B", "A"]
    payload = json.loads(done.stdout)
    assert len(payload["cells"]) == 1 and payload["cells"][0]["samples"] == [2, 2]
    assert any("cannot host a side server" in note and "own `sparsebench run`" in note for note in payload["notes"])


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
    (["--count-also", "headline@fused-*"], "--count-also and --cycles-cells belong to the counted tier: add --count"),
])
def test_ab_bad_input_is_one_line(tmp_path, args, message):
    done = cli("ab", "--suite", str(TINY), "--output", str(tmp_path / "ab"), *args, check=2)
    assert message in done.stderr and "Traceback" not in done.stderr


def test_a_kill_9_of_ab_takes_its_side_servers_with_them(tmp_path):
    """Side B's interpreter is a stand-in whose side server would run for two minutes:
    once `ab` is killed with SIGKILL, the side server must die with it (parent-death
    signal), and with it everything it started."""
    import signal
    import time

    import psutil

    marker = tmp_path / "side.pid"
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\n"
                    'case "$*" in\n'
                    '  *sparsebench.execute.side*--protocol*) echo 1; exit 0;;\n'
                    f'  *sparsebench.execute.side*) echo $$ > {marker}; exec sleep 120;;\n'
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
        pytest.fail(f"side B's server never started; ab said: {ab.communicate()[0]}")
    side = psutil.Process(int(marker.read_text()))
    ab.send_signal(signal.SIGKILL)
    ab.wait()
    try:
        side.wait(timeout=30)
    except psutil.TimeoutExpired:
        side.kill()
        pytest.fail("side B's server outlived the killed ab")


@pytest.mark.skipif(__import__("shutil").which("valgrind") is None, reason="valgrind is not installed")
def test_ab_count_counts_both_sides_and_an_a_a_run_changes_nothing(tmp_path):
    """The counted tier end to end on the tiny suite: both sides under callgrind, every cell
    counted, instructions per example equal to well within the 1% threshold. Side B's
    interpreter is a wrapper script (valgrind does not follow a script into the Python it
    execs): its cells are counted all the same, by its own side server."""
    shim = wrapper(tmp_path, "python-shim", "export PYENV_VERSION=3.11")
    done = cli("ab", "--count", "--suite", str(TINY), "--count-steps", "3", "--format", "json", "--b-python", str(shim),
               "--output", str(tmp_path / "ab"), check=0)
    payload = json.loads(done.stdout)
    assert payload["metric"] == "instructions" and payload["cycles"]["metric"] == "cycles"
    assert [c["status"] for c in payload["cells"]] == ["unchanged", "unchanged"]
    assert all(abs(c["ratio"] - 1) < 0.01 for c in payload["cells"])
    for side in ("a", "b"):
        records = read_results(tmp_path / "ab" / f"{side}-count.jsonl").records
        assert all(r.counted_steps == 3 and r.instructions_per_example > 0 and r.count_functions for r in records)
        assert all(r.threads_in_effect["intra_op_threads_resolved"] == 1 for r in records)


def test_a_gated_first_cell_waits_for_its_worker_to_say_it_started(tmp_path):
    """A worker writes `ready` after importing TensorFlow, before its first cell; an A/B
    side's first cell of a round waits for it (the other side is not timed while this
    side's worker still spends a core starting up)."""
    import threading

    from sparsebench.execute.orchestrator import Orchestrator

    seen = []
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        orchestrator = Orchestrator(record=lambda outcome: None,
                                    on_ready=lambda: seen.append((tmp_path / "ready").exists()))
        orchestrator._process = sleeper
        writer = threading.Timer(1.0, lambda: (tmp_path / "ready").write_text("1"))
        writer.start()
        orchestrator._wait_ready(tmp_path)
        writer.join()
    finally:
        sleeper.kill()
    assert seen == [True]


def test_a_sides_server_imports_its_own_sparsebench_not_the_current_directorys(tmp_path, monkeypatch):
    """`python -m` puts the current directory first on sys.path: `ab` run in a checkout ran
    the checkout's code on both sides, and a slowdown planted in side B's venv went unseen.
    Here the current directory holds a sparsebench whose side server answers WRONG."""
    from sparsebench.execute.ab import side_protocol
    from sparsebench.modules import module_command

    fake = tmp_path / "sparsebench" / "execute"
    fake.mkdir(parents=True)
    for init in (tmp_path / "sparsebench" / "__init__.py", fake / "__init__.py"):
        init.write_text("")
    (fake / "side.py").write_text("print('WRONG')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    plain = subprocess.run([sys.executable, "-m", "sparsebench.execute.side", "--protocol"], cwd=tmp_path,
                           capture_output=True, text=True, env=env)
    assert plain.stdout.strip() == "WRONG"  # what `-m` does: the reason for module_command
    ours = subprocess.run(module_command(sys.executable, "sparsebench.execute.side", "--protocol"), cwd=tmp_path,
                          capture_output=True, text=True, env=env)
    assert ours.stdout.splitlines()[0] == "1", ours.stdout + ours.stderr
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    assert side_protocol(sys.executable) == "1"
