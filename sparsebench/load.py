"""Is the machine busy? What else used it while a cell ran, and is it fit to measure now.

A throughput measured beside another busy process, a hypervisor stealing cycles, a disk
stall or a CPU clocked down is low for reasons that are not the code's. pyperf records
and warns about the same things (`pyperf system show`); sparsebench reads them from Linux's
/proc and /sys (no TensorFlow, so the CLI can do it), records them with every cell and
run, and says so wherever such a figure is shown.

Every reader takes the /proc and /sys roots as arguments so tests can point them at fake
trees. Where a file is missing (not Linux, a container without cpufreq) the fact is None
and nothing is claimed about it.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BUSY_CORES = 0.5  # other processes, steal or iowait beyond this many cores make a figure suspect
PROC, SYS = Path("/proc"), Path("/sys")
CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def _ticks_per_second() -> float:
    try:
        return float(os.sysconf("SC_CLK_TCK"))
    except (ValueError, OSError, AttributeError):
        return 100.0


@dataclass
class CpuTimes:
    """The machine's `cpu` line of /proc/stat, in seconds."""

    at: float  # time.monotonic() when read
    busy: float  # everything but idle and iowait
    iowait: float
    steal: float


def read_cpu_times(proc: Path = PROC) -> CpuTimes | None:
    try:
        line = (proc / "stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not line or line[0] != "cpu" or len(line) < 9:
        return None
    try:
        values = dict(zip(CPU_FIELDS, (int(v) / _ticks_per_second() for v in line[1:9])))
    except ValueError:
        return None
    busy = sum(values[k] for k in CPU_FIELDS if k not in ("idle", "iowait"))
    return CpuTimes(time.monotonic(), busy, values["iowait"], values["steal"])


def read_load_average(proc: Path = PROC) -> tuple[float, float, float] | None:
    try:
        parts = (proc / "loadavg").read_text().split()
        return float(parts[0]), float(parts[1]), float(parts[2])
    except (OSError, IndexError, ValueError):
        return None


@dataclass
class Frequency:
    """CPU frequency scaling: the governors in use and how far below its maximum the CPU runs."""

    governors: list[str]
    current_mhz: float | None
    max_mhz: float | None

    @property
    def ratio(self) -> float | None:
        return self.current_mhz / self.max_mhz if self.current_mhz and self.max_mhz else None


def read_frequency(sys_root: Path = SYS) -> Frequency:
    governors, current, maximum = set(), [], []
    for cpu in sorted((sys_root / "devices/system/cpu").glob("cpu[0-9]*/cpufreq")):
        for name, into in (("scaling_cur_freq", current), ("cpuinfo_max_freq", maximum)):
            try:
                into.append(int((cpu / name).read_text().strip()) / 1000.0)
            except (OSError, ValueError):
                pass
        try:
            governors.add((cpu / "scaling_governor").read_text().strip())
        except OSError:
            pass
    mean = (lambda xs: sum(xs) / len(xs) if xs else None)
    return Frequency(sorted(governors), mean(current), max(maximum) if maximum else None)


@dataclass
class MachineLoad:
    """What the whole machine did between two readings, in cores' worth (seconds of CPU
    per wall second), beside the 1-minute load average at the end."""

    seconds: float
    busy_cores: float  # everything but idle and iowait (ours and steal included)
    other_cores: float | None  # busy minus steal and our own processes' CPU, where that is known
    steal_cores: float
    iowait_cores: float
    load_1m: float | None
    cores: int

    def problems(self) -> list[str]:
        """What makes a figure measured meanwhile suspect, one phrase each."""
        phrases = {"other": "other processes used {:.1f} cores", "steal": "the hypervisor stole {:.1f} cores",
                   "iowait": "{:.1f} cores waited on I/O"}
        return [phrases[kind].format(cores)
                for kind, cores in busy_parts(self.other_cores, self.steal_cores, self.iowait_cores)]

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def between(before: CpuTimes | None, after: CpuTimes | None, own_cpu_seconds: float | None = None,
            proc: Path = PROC, cores: int | None = None) -> MachineLoad | None:
    if before is None or after is None or after.at <= before.at:
        return None
    seconds = after.at - before.at
    busy = max(after.busy - before.busy, 0.0) / seconds
    steal = max(after.steal - before.steal, 0.0) / seconds
    other = None if own_cpu_seconds is None else max(busy - steal - own_cpu_seconds / seconds, 0.0)
    return MachineLoad(seconds, busy, other, steal,
                       max(after.iowait - before.iowait, 0.0) / seconds, (read_load_average(proc) or (None,))[0],
                       cores or os.cpu_count() or 1)


@dataclass
class Check:
    """`sparsebench env --check`: the machine right now, and whether it is fit to measure."""

    load: MachineLoad | None
    load_average: tuple[float, float, float] | None
    frequency: Frequency
    busiest: list[tuple[str, int, float]] = field(default_factory=list)  # (name, pid, cores) of other processes
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def fit(self) -> bool:
        return not self.problems


def check_machine(seconds: float = 1.0, proc: Path = PROC, sys_root: Path = SYS,
                  cores: int | None = None) -> Check:
    """Watch the machine for `seconds` while this process sleeps: everything busy meanwhile
    is someone else's. Also the load average (recent minutes) and frequency scaling."""
    import psutil

    cores = cores or os.cpu_count() or 1
    others = {}
    for process in psutil.process_iter(["name"]):
        if process.pid == os.getpid():
            continue
        try:
            process.cpu_percent(None)  # starts its counter
            others[process.pid] = process
        except (psutil.Error, OSError):
            pass
    before = read_cpu_times(proc)
    time.sleep(seconds)
    after = read_cpu_times(proc)
    load = between(before, after, 0.0, proc, cores)
    busiest = []
    for pid, process in others.items():
        try:
            share = process.cpu_percent(None) / 100.0
        except (psutil.Error, OSError):
            continue
        if share >= 0.05:
            busiest.append((process.info.get("name") or "?", pid, share))
    busiest.sort(key=lambda item: -item[2])
    averages = read_load_average(proc)
    frequency = read_frequency(sys_root)
    return Check(load, averages, frequency, busiest[:5], *judge(load, averages, frequency, cores))


def judge(load: MachineLoad | None, averages: tuple[float, float, float] | None, frequency: Frequency,
          cores: int) -> tuple[list[str], list[str]]:
    """(problems that make the machine unfit now, notes that are worth knowing)."""
    problems = load.problems() if load is not None else []
    notes = []
    if load is None:
        notes.append("/proc/stat unreadable: other processes, steal and iowait unknown")
    if averages is not None and averages[0] >= BUSY_CORES + (load.busy_cores if load else 0.0):
        notes.append(f"1-minute load average {averages[0]:.2f} on {cores} cores: the machine was busy in the last "
                     f"minutes")
    unsteady = [g for g in frequency.governors if g not in ("performance",)]
    if unsteady:
        problems.append(f"CPU frequency governor {', '.join(unsteady)} (not performance): the clock follows the "
                        f"load, so rates depend on what ran before")
    if not frequency.governors:
        notes.append("no CPU frequency scaling readable (a VM, or cpufreq absent): the clock is the host's business")
    elif frequency.ratio is not None and frequency.ratio < 0.9:
        notes.append(f"CPU at {frequency.current_mhz:.0f} of {frequency.max_mhz:.0f} MHz right now")
    return problems, notes


def busy_parts(other: float | None, steal: float | None, iowait: float | None) -> list[tuple[str, float]]:
    """The kinds of load ("other", "steal", "iowait") at or over BUSY_CORES, with their cores:
    the one threshold a cell's record and a machine check are judged by."""
    return [(kind, cores) for kind, cores in (("other", other), ("steal", steal), ("iowait", iowait))
            if cores is not None and cores >= BUSY_CORES]


def busy_text(other: float | None, steal: float | None, iowait: float | None = None) -> str | None:
    """'1.0 other cores' / '0.6 cores stolen' for a record's figures at or over BUSY_CORES, else None."""
    phrases = {"other": "{:.1f} other cores", "steal": "{:.1f} cores stolen", "iowait": "{:.1f} cores in iowait"}
    return ", ".join(phrases[kind].format(cores) for kind, cores in busy_parts(other, steal, iowait)) or None


SHORTEST_WINDOW_S = 0.2  # /proc/stat's 10 ms ticks say nothing over shorter windows (the worker's cputime too)


def _flat(values: list) -> list[float]:
    """A process's windows, or a merged record's windows per process, as one list."""
    return [v for item in values for v in (item if isinstance(item, list) else [item]) if isinstance(v, (int, float))]


def record_busy(record) -> str | None:
    """What else ran while a record (record.Record) was measured, where it was enough to
    matter; None otherwise. Windows shorter than SHORTEST_WINDOW_S (records written before
    the worker refused to judge them) give no other/steal figure worth a warning."""
    seconds = sorted(_flat(record.window_seconds or []))
    short = bool(seconds) and seconds[len(seconds) // 2] < SHORTEST_WINDOW_S
    return busy_text(None if short else record.other_cores, None if short else record.steal_cores,
                     getattr(record, "iowait_cores", None))


def busy_warning(records: list, source: str = "") -> str | None:
    """One line naming the ok records measured on a busy machine (pyperf-style), or None."""
    ok = [r for r in records if getattr(r, "status", "ok") == "ok"]
    busy = [(r.cell_id, text) for r in ok if (text := record_busy(r))]
    if not busy:
        return None
    where = f"{source}: " if source else ""
    return (f"{where}{len(busy)} of {len(ok)} cells were measured on a busy machine (other processes, hypervisor "
            f"steal or iowait of {BUSY_CORES:g} core or more while they ran), e.g. {busy[0][0]} ({busy[0][1]}): "
            f"their rates are likely low; `sparsebench env --check` says whether this machine is fit to measure now")
