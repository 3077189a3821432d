"""The busy-machine detector on fake /proc and /sys trees, and its warnings in run, report,
compare and history."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sparsebench import load
from sparsebench.execute.runner import RunSummary
from sparsebench.results import read_results

TALK = Path(__file__).parent / "fixtures" / "talk.jsonl"
TICKS = 100  # USER_HZ on Linux


def fake_proc(root: Path, *, busy: float, iowait: float = 0.0, steal: float = 0.0, idle: float = 1000.0,
              loadavg: str = "0.10 0.20 0.30 1/100 42") -> Path:
    """/proc/stat's cpu line with these totals in seconds (busy split into user and system)."""
    root.mkdir(parents=True, exist_ok=True)
    ticks = [int(busy * TICKS * 0.8), 0, int(busy * TICKS * 0.2), int(idle * TICKS), int(iowait * TICKS), 0, 0,
             int(steal * TICKS)]
    (root / "stat").write_text("cpu  " + " ".join(map(str, ticks)) + " 0 0\ncpu0 1 2 3 4\n")
    (root / "loadavg").write_text(loadavg + "\n")
    return root


def fake_sys(root: Path, governor: str | None, cur_khz: int = 2_000_000, max_khz: int = 3_000_000) -> Path:
    for cpu in ("cpu0", "cpu1"):
        freq = root / "devices/system/cpu" / cpu / "cpufreq"
        freq.mkdir(parents=True)
        if governor:
            (freq / "scaling_governor").write_text(governor + "\n")
        (freq / "scaling_cur_freq").write_text(f"{cur_khz}\n")
        (freq / "cpuinfo_max_freq").write_text(f"{max_khz}\n")
    return root


class FakeClock:
    """time for load.py: sleep() advances monotonic() and lets the test change /proc meanwhile."""

    def __init__(self, on_sleep):
        self.now, self.on_sleep = 100.0, on_sleep

    def monotonic(self):
        return self.now

    def sleep(self, seconds):
        self.now += seconds
        self.on_sleep()


def test_cpu_times_and_the_load_between_two_readings(tmp_path, monkeypatch):
    monkeypatch.setattr(load, "_ticks_per_second", lambda: float(TICKS))
    proc = fake_proc(tmp_path / "a", busy=100, iowait=5, steal=2)
    before = load.read_cpu_times(proc)
    assert (before.busy, before.iowait, before.steal) == pytest.approx((102.0, 5.0, 2.0))  # steal counts as busy
    fake_proc(proc, busy=110, iowait=6.2, steal=2.8, loadavg="1.50 1.00 0.50 3/100 42")
    after = load.read_cpu_times(proc)
    after.at = before.at + 4.0
    during = load.between(before, after, own_cpu_seconds=4.0, proc=proc, cores=2)
    assert during.busy_cores == pytest.approx(10.8 / 4)  # 10 busy + 0.8 steal over 4 s
    assert during.other_cores == pytest.approx(10 / 4 - 1.0)  # neither steal nor ours
    assert during.iowait_cores == pytest.approx(0.3) and during.steal_cores == pytest.approx(0.2)
    assert during.load_1m == 1.5
    assert during.problems() == ["other processes used 1.5 cores"]


def test_unreadable_or_odd_proc_claims_nothing(tmp_path):
    assert load.read_cpu_times(tmp_path / "none") is None
    (tmp_path / "stat").write_text("intr 1 2 3\n")
    assert load.read_cpu_times(tmp_path) is None
    assert load.read_load_average(tmp_path) is None
    assert load.between(None, None) is None
    assert load.read_frequency(tmp_path) == load.Frequency([], None, None)


def test_frequency_and_the_governor(tmp_path):
    freq = load.read_frequency(fake_sys(tmp_path / "a", "powersave"))
    assert freq.governors == ["powersave"] and freq.ratio == pytest.approx(2 / 3)
    problems, notes = load.judge(None, (0.1, 0.1, 0.1), freq, 2)
    assert any("governor powersave" in p for p in problems)
    assert any("2000 of 3000 MHz" in n for n in notes)
    problems, _ = load.judge(None, None, load.read_frequency(fake_sys(tmp_path / "b", "performance")), 2)
    assert problems == []


@pytest.mark.parametrize("other, steal, iowait, fit", [
    (0.0, 0.0, 0.0, True),
    (1.0, 0.0, 0.0, False),  # a `yes` beside us
    (0.0, 0.6, 0.0, False),  # a noisy neighbour on the host
    (0.0, 0.0, 0.7, False),  # the disk
    (0.4, 0.4, 0.4, True),   # each below the threshold
])
def test_check_machine_on_a_fake_proc(tmp_path, monkeypatch, other, steal, iowait, fit):
    monkeypatch.setattr(load, "_ticks_per_second", lambda: float(TICKS))
    proc = fake_proc(tmp_path / "proc", busy=50)
    sys_root = fake_sys(tmp_path / "sys", "performance", 3_000_000, 3_000_000)
    clock = FakeClock(lambda: fake_proc(proc, busy=50 + 2 * other, steal=2 * steal, iowait=2 * iowait))
    monkeypatch.setattr(load, "time", clock)
    found = load.check_machine(2.0, proc=proc, sys_root=sys_root, cores=2)
    assert found.fit is fit, found.problems
    assert found.load.busy_cores == pytest.approx(other + steal, abs=0.01)


def test_the_run_summary_warns_about_busy_cells():
    records = read_results(TALK).latest()
    summary = RunSummary(path=Path("r.jsonl"), records=list(records))
    assert summary.busy_warning is None
    records[0].other_cores = 1.2
    assert "1 of 5 cells were measured on a busy machine" in summary.busy_warning
    assert "1.2 other cores" in summary.busy_warning
    records[0].other_cores, records[1].iowait_cores = 0.1, 0.9
    assert "0.9 cores in iowait" in summary.busy_warning


def busy_copy(tmp_path: Path) -> Path:
    lines = TALK.read_text().splitlines()
    out = [lines[0]]
    for line in lines[1:]:
        record = json.loads(line)
        if record["status"] == "ok":
            record["other_cores"] = 1.0
        out.append(json.dumps(record))
    path = tmp_path / "busy.jsonl"
    path.write_text("\n".join(out) + "\n")
    return path


def cli(*args):
    return subprocess.run([sys.executable, "-m", "sparsebench", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_report_and_compare_warn_about_a_busy_run_and_stay_quiet_otherwise(tmp_path):
    busy = busy_copy(tmp_path)
    done = cli("report", busy)
    assert done.returncode == 0 and "5 of 5 cells were measured on a busy machine" in done.stderr
    assert "busy machine" not in cli("report", TALK).stderr
    compared = cli("compare", TALK, busy)
    assert "current" in compared.stdout and "were measured on a busy machine" in compared.stdout
    assert "busy machine" not in cli("compare", TALK, TALK).stdout


def test_env_check_on_this_machine():
    done = cli("env", "--check", "--seconds", "0.5", "--json")
    assert done.returncode in (0, 1), done.stderr
    found = json.loads(done.stdout)
    assert found["fit"] is (done.returncode == 0) and found["fit"] is (not found["problems"])
    assert found["load"]["seconds"] == pytest.approx(0.5, abs=0.4)


def test_windows_too_short_for_proc_stat_give_no_busy_warning():
    """A 3 ms window read 3.2 'other' cores on a 2-core machine: records written before the
    worker refused such windows must not raise a false alarm."""
    [record] = read_results(TALK).latest()[:1]
    record.other_cores, record.window_seconds = 3.2, [0.003, 0.002, 0.003]
    assert load.record_busy(record) is None
    record.window_seconds = [0.4, 0.4, 0.4]
    assert load.record_busy(record) == "3.2 other cores"


def test_a_merged_record_from_a_real_run_is_judged_by_its_windows_per_process(tmp_path):
    """Merged records hold window_seconds per process (a list of lists): report and compare
    read those (a TypeError once, on a real run's file)."""
    [record] = read_results(TALK).latest()[:1]
    record.other_cores, record.window_seconds = 1.0, [[0.4, 0.41, 0.39], [0.4, 0.4, 0.4]]
    assert load.record_busy(record) == "1.0 other cores"
    record.window_seconds = [[0.003, 0.002], [0.003]]
    assert load.record_busy(record) is None


def test_a_run_records_the_machine_before_its_first_cell_and_warns_when_busy(monkeypatch, capsys):
    from sparsebench.execute import runner

    busy = load.MachineLoad(1.0, 2.0, 2.0, 0.0, 0.0, 1.9, 2)
    check = load.Check(busy, (1.9, 1.0, 0.5), load.Frequency([], None, None), [("yes", 42, 1.0)],
                       busy.problems(), [])
    monkeypatch.setattr(runner.load, "check_machine", lambda seconds: check)
    state = runner.machine_at_start()
    assert state["load"]["other_cores"] == 2.0 and state["busiest"] == [{"name": "yes", "pid": 42, "cores": 1.0}]
    err = capsys.readouterr().err
    assert "warning: the machine is not quiet before the first cell: other processes used 2.0 cores (yes 1.0)" in err
    quiet = load.MachineLoad(1.0, 0.05, 0.05, 0.0, 0.0, 0.1, 2)
    monkeypatch.setattr(runner.load, "check_machine",
                        lambda seconds: load.Check(quiet, None, load.Frequency([], None, None), [], [], []))
    assert runner.machine_at_start()["problems"] == []
    assert capsys.readouterr().err == ""
