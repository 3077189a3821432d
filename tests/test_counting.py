"""Counted work (`ab --count`): callgrind's dumps are read right, the shim's requests count
exactly the steps between them (where valgrind is installed), and the CI self-gate reads
`perf-accepted:`."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sparsebench.analyze.counted import counted_report, function_changes
from sparsebench.record import Record
from sparsebench.train.measure.counting import estimated_cycles, parse_callgrind

ROOT = Path(__file__).resolve().parent.parent

# A callgrind dump by hand: name compression (a name defined where it first appears, also
# as a callee), a call whose next cost line is the callee's inclusive cost (not the caller's).
DUMP = textwrap.dedent("""\
    # callgrind format
    version: 1
    creator: callgrind-3.19.0
    desc: Trigger: Client Request: cell 0: x
    positions: line
    events: Ir I1mr D1mr D1mw ILmr DLmr DLmw
    summary: 0

    ob=(1) /lib/libtf.so
    fl=(1) ???
    fn=(1) outer
    0 100 1 2 0 0 1 0
    cob=(2) /lib/libc.so
    cfi=(2) ???
    cfn=(2) memcpy
    calls=3 0
    0 400 0 10 0 0 0 0
    0 50
    ob=(2)
    fl=(2)
    fn=(2)
    0 400 0 10 0 0 0 0
    totals: 550 1 12 0 0 1 0
    """)


def test_a_dump_is_read_with_exclusive_costs_per_function(tmp_path):
    path = tmp_path / "callgrind.1.1"
    path.write_text(DUMP)
    profile = parse_callgrind(path)
    assert profile.label == "cell 0: x" and profile.totals["Ir"] == 550
    assert profile.functions == {"outer [libtf.so]": {"Ir": 150, "I1mr": 1, "D1mr": 2, "D1mw": 0, "ILmr": 0,
                                                      "DLmr": 1, "DLmw": 0},
                                 "memcpy [libc.so]": {"Ir": 400, "I1mr": 0, "D1mr": 10, "D1mw": 0, "ILmr": 0,
                                                      "DLmr": 0, "DLmw": 0}}
    assert sum(f["Ir"] for f in profile.functions.values()) == profile.totals["Ir"]
    assert estimated_cycles(profile.totals) == 550 + 10 * 13 + 100 * 1


def _counted(cell_id, cycles, functions, status="ok"):
    return Record(cell_id=cell_id, axes={}, status=status, round=1, cycles_per_example=cycles,
                  instructions_per_example=cycles / 2, count_functions=functions)


def test_the_counted_report_flags_a_1_percent_change_and_names_the_function(tmp_path):
    from fixtures.make_fixtures import write_to

    from sparsebench.results import read_results

    base = {"tf::Sort [libtf.so]": {"Ir": 10.0, "cycles": 20.0}, "memcpy [libc.so]": {"Ir": 500.0, "cycles": 900.0},
            "tiny [libtf.so]": {"Ir": 1.0, "cycles": 1.0}}
    slower = {**base, "tf::Sort [libtf.so]": {"Ir": 40.0, "cycles": 80.0}}
    write_to(tmp_path / "a.jsonl", [_counted("c1", 1000.0, base), _counted("c2", 1000.0, base)], "s")
    write_to(tmp_path / "b.jsonl", [_counted("c1", 1011.0, slower), _counted("c2", 1004.0, base)], "s")
    report = counted_report(read_results(tmp_path / "a.jsonl"), read_results(tmp_path / "b.jsonl"))
    one, two = report.cells
    assert one.status == "regressed" and two.status == "unchanged" and report.exit_code == 1
    assert one.note.startswith("+30 Ir/ex (+300%) tf::Sort [libtf.so]")
    assert two.note == ""  # only a flagged cell says where


def test_a_cell_b_stopped_counting_fails_and_a_tier_that_counted_nothing_exits_2(tmp_path):
    """B skipped where A counted (a wrapper interpreter that valgrind did not follow was
    such a case): failed; no cell counted on both sides: the tier could not run (exit 2)."""
    from fixtures.make_fixtures import write_to

    from sparsebench.results import read_results

    a = [_counted("c1", 1000.0, {}), _counted("c2", 1000.0, {})]
    skipped = [_counted("c1", 1000.0, {}), _counted("c2", 1000.0, {}, status="skipped")]
    write_to(tmp_path / "a.jsonl", a, "s")
    write_to(tmp_path / "b.jsonl", skipped, "s")
    report = counted_report(read_results(tmp_path / "a.jsonl"), read_results(tmp_path / "b.jsonl"))
    assert [c.status for c in report.cells] == ["unchanged", "failed"] and report.exit_code == 1
    write_to(tmp_path / "a2.jsonl", [_counted("c1", 1000.0, {}, status="skipped")], "s")
    write_to(tmp_path / "b2.jsonl", [_counted("c1", 1000.0, {}, status="skipped")], "s")
    nothing = counted_report(read_results(tmp_path / "a2.jsonl"), read_results(tmp_path / "b2.jsonl"))
    assert nothing.exit_code == 2 and "NOTHING COMPARED" in nothing.summary()


def test_a_function_below_one_sides_cut_is_not_called_new():
    """Each side lists its costliest functions only: one missing on a side is unknown there
    unless the other side's cost is above that side's cut (then it would have been listed)."""
    a = _counted("c", 1.0, {"big [x]": {"Ir": 100.0}, "mid [x]": {"Ir": 10.0}, "low [x]": {"Ir": 6.0}})
    b = _counted("c", 1.0, {"big [x]": {"Ir": 100.0}, "other [x]": {"Ir": 4.0}, "new [x]": {"Ir": 50.0}})
    text = function_changes(a, b, "Ir")
    assert text.startswith("+50 Ir/ex (new) new [x]") and "-10 Ir/ex (-100%) mid [x]" in text
    assert "other" not in text  # 4 on B, below A's cut of 6: A may well have had it


def test_the_self_gate_names_a_reference_that_keeps_its_rules():
    """.ci/perf-baseline names one full commit id (not a moving branch name) that is a
    first-parent ancestor of HEAD within the last 50 commits (the rules CI applies)."""
    from sparsebench.execute.commits import check_reference

    named = [line for line in (ROOT / ".ci" / "perf-baseline").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert len(named) == 1 and len(named[0].strip()) == 40
    if not (ROOT / ".git").exists():
        pytest.skip("this checkout has no git history")
    assert check_reference(ROOT, named[0].strip(), ".ci/perf-baseline") == named[0].strip()


@pytest.mark.skipif(shutil.which("valgrind") is None or not Path("/usr/include/valgrind/callgrind.h").exists(),
                    reason="valgrind is not installed")
def test_the_shim_counts_exactly_the_work_between_its_requests(tmp_path):
    """Under callgrind: a loop of N additions counted once with N and once with 2N
    iterations; the counts differ by the loop, and twice the work counts about twice."""
    script = tmp_path / "count.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from sparsebench.train.measure.counting import Shim
        shim = Shim()
        assert shim.under_valgrind
        def work(n):
            total = 0
            for i in range(n):
                total += i
        shim.count(lambda: work(20000), "small")
        shim.count(lambda: work(40000), "large")
    """))
    env = {**os.environ, "PYTHONHASHSEED": "0", "SPARSEBENCH_OPS_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(["valgrind", "--tool=callgrind", "--instr-atstart=no",
                           f"--callgrind-out-file={tmp_path}/callgrind.%p", sys.executable, str(script)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    dumps = sorted(tmp_path.glob("callgrind.*.*"), key=lambda p: int(p.name.rsplit(".", 1)[1]))
    small, large = (parse_callgrind(p) for p in dumps)
    assert (small.label, large.label) == ("small", "large")
    ratio = large.totals["Ir"] / small.totals["Ir"]
    assert 1.8 < ratio < 2.2, (small.totals, large.totals)


def test_the_fused_ops_library_is_named_alike_on_both_sides():
    """Each venv builds its own copy of the op (the build key differs); its functions must
    still pair up between the sides."""
    from sparsebench.train.measure.counting import object_name

    a = object_name("/a/ops/sparsebench_fused_layer-tf2.21.0-1a1ebb80667e6552.so")
    b = object_name("/b/ops/sparsebench_fused_layer-tf2.21.0-415b4a83b8bc14a9.so")
    assert a == b == "sparsebench_fused_layer-tf2.21.0.so"
    assert object_name("/usr/lib/libc.so.6") == "libc.so.6"


def test_a_cell_is_judged_by_its_median_step_so_one_unusual_step_cannot_move_it():
    """One of five counted steps copied a table (an extra memcpy): the cell's figure is the
    median step's, and every step's count is kept."""
    from sparsebench.train.measure.counting import CountedProfile, median_step

    steps = [CountedProfile(["Ir"], {"Ir": ir}, {"f [x]": {"Ir": ir}}) for ir in (1000, 1002, 9000, 999, 1001)]
    median, counts = median_step(steps)
    assert median.totals["Ir"] == 1001 and counts == [1000, 1002, 9000, 999, 1001]


IDLE = "Eigen::ThreadPoolTempl<tsl::thread::EigenEnvironment>::MaybeGetTask(tsl::thread::EigenEnvironment::Task*) [libtensorflow_framework.so.2]"


def test_a_pool_threads_spinning_is_left_out_of_the_counted_work():
    """An A/A pair differed only in Eigen's MaybeGetTask (a pool thread spinning for work, as
    long as the scheduler lets it): the counted figures and functions leave it out, and the
    step series keeps it apart."""
    from sparsebench.train.measure.counting import CountedProfile, per_example, step_series

    work = {"tf::MatMul [libtf.so]": {"Ir": 3000, "D1mr": 10}}
    quiet = CountedProfile(["Ir", "D1mr"], {"Ir": 3100, "D1mr": 10}, {**work, IDLE: {"Ir": 100, "D1mr": 0}})
    spun = CountedProfile(["Ir", "D1mr"], {"Ir": 103000, "D1mr": 10}, {**work, IDLE: {"Ir": 100000, "D1mr": 0}})
    figures = [per_example(p, 10) for p in (quiet, spun)]
    assert figures[0]["instructions_per_example"] == figures[1]["instructions_per_example"] == 300
    assert figures[0]["cycles_per_example"] == figures[1]["cycles_per_example"] == 310
    assert all(IDLE not in f["count_functions"] for f in figures)
    series = step_series([quiet, spun])
    assert series["counted_step_instructions"] == [3000, 3000]
    assert series["counted_step_idle_instructions"] == [100, 100000]


def _stepped(cell_id, steps):
    return Record(cell_id=cell_id, axes={}, status="ok", round=1, counted_steps=len(steps),
                  instructions_per_example=sorted(steps)[len(steps) // 2] / 10, cycles_per_example=1.0,
                  counted_step_instructions=list(steps), counted_step_cycles=[1.0] * len(steps))


def test_steps_pair_up_across_sides_so_the_median_step_cannot_be_two_different_steps(tmp_path):
    """Steps alternate between two batches (4.10M and 3.93M instructions here); one step of
    B did less (3.89M against A's 3.98M). Judged by each side's own median step, B's median
    is another step than A's: -1.0%, a false finding at a 1% threshold. Paired step by step
    the median change is nil."""
    from fixtures.make_fixtures import write_to

    from sparsebench.results import read_results

    write_to(tmp_path / "a.jsonl", [_stepped("c1", [4_104_663, 3_932_707, 3_984_027])], "s")
    write_to(tmp_path / "b.jsonl", [_stepped("c1", [4_104_663, 3_932_707, 3_891_140])], "s")
    a, b = read_results(tmp_path / "a.jsonl"), read_results(tmp_path / "b.jsonl")
    [cell] = counted_report(a, b, threshold=0.005).cells
    assert cell.status == "unchanged" and cell.ratio == 1.0
    # the same steps 2% costlier on every step of B: found
    write_to(tmp_path / "c.jsonl", [_stepped("c1", [x * 1.02 for x in (4_104_663, 3_932_707, 3_984_027)])], "s")
    [cell] = counted_report(a, read_results(tmp_path / "c.jsonl")).cells
    assert cell.status == "regressed" and abs(cell.ratio - 1 / 1.02) < 1e-9
