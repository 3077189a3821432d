"""CPU time: what a step cost the machine's cores, beside what it cost the wall clock.

Wall time on a shared 2-core VM moves with everything else the host does; the CPU time
this process spent (user + system, every thread) moves about half as much between
processes (measured on the 2-core development VM: CV 9-12% vs 20-22%), because time the process was not scheduled does
not count. So every window records both: `time.process_time()` for the whole process, and
per thread name (`/proc/self/task/*/stat`, Linux) over all the timed windows, which says
which pool the time went to (`tf_Compute` is TensorFlow's inter-op pool; the intra-op
pool's threads carry the process's name, `python`).
"""

from __future__ import annotations

import os
import time
from collections import Counter

from ...load import SHORTEST_WINDOW_S

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds() -> float:
    """User + system CPU seconds of this process so far, every thread included."""
    return time.process_time()


def thread_cpu_seconds() -> dict[str, float] | None:
    """CPU seconds (user + system) each thread name has used so far, summed over the
    threads of that name; None where /proc is not there. A thread that ended is gone
    from the sum, so take differences over spans in which the pools live."""
    totals: Counter = Counter()
    try:
        tasks = list(os.scandir("/proc/self/task"))
    except OSError:
        return None
    for task in tasks:
        try:
            with open(f"{task.path}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue  # the thread ended while we read
        # "tid (comm) state ... utime stime ...": comm may hold spaces and parentheses
        name, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        totals[name] += (int(rest[11]) + int(rest[12])) / CLOCK_TICKS
    return dict(totals)


def thread_cpu_difference(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float] | None:
    """CPU seconds per thread name between two readings (names that used none left out)."""
    if before is None or after is None:
        return None
    spent = {name: after[name] - before.get(name, 0.0) for name in after}
    return {name: round(seconds, 4) for name, seconds in sorted(spent.items()) if seconds > 0}


def process_tree_cpu_seconds() -> float:
    """CPU seconds of this process and every process below it (a local parameter-server
    cluster's tasks are the coordinator's children): what a PS cell cost the machine."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass  # a task that ended (a killed worker task) is out of the sum from then on
    return total


def machine_cpu_seconds() -> tuple[float, float] | None:
    """(busy, stolen) CPU seconds of the whole machine so far, from /proc/stat's `cpu` line:
    busy is everything but idle and iowait (this process included), stolen is the time the
    hypervisor ran someone else on our virtual CPUs. None where /proc/stat is not there."""
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    steal = ticks[7] if len(ticks) > 7 else 0
    return (sum(ticks[:8]) - idle) / CLOCK_TICKS, steal / CLOCK_TICKS


# /proc/stat counts in ticks (10 ms) per CPU: over a shorter span its busy time is off by
# more than a core's worth (a 3 ms window read 3.2 "other" cores on a 2-core machine).
MIN_INTERFERENCE_WALL_S = SHORTEST_WINDOW_S


def interference(before: tuple[float, float] | None, after: tuple[float, float] | None, own_cpu: float,
                 wall: float) -> tuple[float | None, float | None]:
    """(other cores, stolen cores) over a span: how many cores' worth of CPU went to other
    processes (the machine's busy time minus ours) and to the hypervisor's other guests.
    A cell that keeps 1.5 cores busy cannot while something else holds one of two."""
    if before is None or after is None or wall < MIN_INTERFERENCE_WALL_S:
        return None, None
    busy, steal = after[0] - before[0], after[1] - before[1]
    return max(busy - steal - own_cpu, 0.0) / wall, steal / wall
