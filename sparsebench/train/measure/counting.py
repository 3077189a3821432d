"""Counted work: instructions and simulated cache misses of a block of train steps, under
valgrind's callgrind, for a gate that does not move with the machine's load.

Wall time on a shared VM varies by tens of percent between minutes; the instructions a
step executes do not (0.03% between processes here, with one intra-op and one inter-op
thread and a fixed hash seed). This VM has no hardware counters, so callgrind counts them
in simulation: the worker runs under `valgrind --tool=callgrind --instr-atstart=no`
(nothing is instrumented while TensorFlow imports and the model builds), and around the
counted steps a tiny C shim issues callgrind's client requests (zero the counters, start
instrumenting, stop, dump with a label). With `--cache-sim=yes` the dump also holds
simulated L1 and last-level misses, from which `estimated_cycles` weighs memory cost the
way cachegrind's documentation suggests (CodSpeed gates on such a figure):

    cycles ~ Ir + 10 x (I1mr + D1mr + D1mw) + 100 x (ILmr + DLmr + DLmw)

The shim is compiled like the fused op (cached by source and compiler) from callgrind's
own header, which Debian's `valgrind` package ships (`/usr/include/valgrind`).
"""

from __future__ import annotations

import ctypes
import fcntl
import gc
import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

from ...errors import CellSkipped
from ...lifetime import die_with_parent

SHIM_SOURCE = """
#include <valgrind/valgrind.h>
#include <valgrind/callgrind.h>
int sb_running(void) { return RUNNING_ON_VALGRIND; }
void sb_zero(void) { CALLGRIND_ZERO_STATS; }
void sb_start(void) { CALLGRIND_START_INSTRUMENTATION; }
void sb_stop(void) { CALLGRIND_STOP_INSTRUMENTATION; }
void sb_dump(const char *label) { CALLGRIND_DUMP_STATS_AT(label); }
"""
HEADER = Path("/usr/include/valgrind/callgrind.h")
L1_MISS_WEIGHT, LL_MISS_WEIGHT = 10, 100
# Idle, not work: a TensorFlow pool thread with nothing to do spins in Eigen's MaybeGetTask
# (then waits on a futex) for as long as the scheduler lets it, so its instructions depend on
# timing. An A/A pair of one-thread cells differed only there, by ~100k instructions a step
# (2.5% of a step at batch 32), in whole spin periods. They are left out of every counted figure
# and kept apart in the record (`counted_step_idle_instructions`).
IDLE_FUNCTIONS = re.compile(r"ThreadPoolTempl<.*>::(MaybeGetTask|WaitForWork)\(|^__futex_abstimed_wait")
TOP_FUNCTIONS = 150  # per cell, by estimated cycles: enough to name what changed (a function below
# the cut on one side is unknown there, not zero: analyze.counted compares accordingly)


class CountingUnavailable(CellSkipped):
    def __init__(self, why: str):
        super().__init__(f"counting unavailable: {why}")


def is_idle(function: str) -> bool:
    """A function whose cost is a pool thread waiting for work (`IDLE_FUNCTIONS`)."""
    return bool(IDLE_FUNCTIONS.search(function))


def estimated_cycles(events: dict[str, float]) -> float:
    """Instructions plus weighted simulated misses (the module docstring's formula)."""
    l1 = sum(events.get(e, 0) for e in ("I1mr", "D1mr", "D1mw"))
    ll = sum(events.get(e, 0) for e in ("ILmr", "DLmr", "DLmw"))
    return events.get("Ir", 0) + L1_MISS_WEIGHT * l1 + LL_MISS_WEIGHT * ll


# -- the shim ----------------------------------------------------------------------------------
def _cache_dir() -> Path:
    base = Path(os.environ.get("SPARSEBENCH_OPS_CACHE") or
                Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sparsebench" / "ops")
    return base


def build_shim() -> Path:
    """The compiled shim (cached); CountingUnavailable without callgrind's header or a C compiler."""
    if not HEADER.exists():
        raise CountingUnavailable(f"{HEADER} is missing (install valgrind: apt-get install valgrind)")
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        raise CountingUnavailable(f"C compiler {cc!r} not found")
    digest = hashlib.sha256((SHIM_SOURCE + cc).encode() + HEADER.read_bytes()).hexdigest()[:16]
    folder = _cache_dir()
    library = folder / f"sparsebench_callgrind_shim-{digest}.so"
    if library.exists():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{library.stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if library.exists():
            return library
        source = folder / f".{library.stem}.{os.getpid()}.c"
        partial = folder / f".{library.name}.{os.getpid()}.tmp"
        source.write_text(SHIM_SOURCE)
        done = subprocess.run([cc, "-O2", "-shared", "-fPIC", str(source), "-o", str(partial)], capture_output=True,
                              text=True, timeout=120, preexec_fn=die_with_parent)
        source.unlink(missing_ok=True)
        if done.returncode != 0:
            partial.unlink(missing_ok=True)
            raise CountingUnavailable(f"compiling the callgrind shim failed: {done.stderr.strip()[:200]}")
        os.replace(partial, library)
    return library


class Shim:
    """Callgrind's client requests, callable from Python (no-ops outside valgrind)."""

    def __init__(self, library: Path | None = None):
        self.lib = ctypes.CDLL(str(library or build_shim()))
        self.lib.sb_dump.argtypes = [ctypes.c_char_p]

    @property
    def under_valgrind(self) -> bool:
        return bool(self.lib.sb_running())

    def count(self, run: Callable[[], None], label: str) -> None:
        """Counters zeroed, instrumentation on around `run()` only, then a dump named `label`."""
        self.lib.sb_zero()
        self.lib.sb_start()
        try:
            run()
        finally:
            self.lib.sb_stop()
            self.lib.sb_dump(label.encode())


# -- reading callgrind's dumps -------------------------------------------------------------------
@dataclass
class CountedProfile:
    """One dump: the totals of each event, and each function's own (exclusive) events."""

    events: list[str]
    totals: dict[str, int]
    functions: dict[str, dict[str, int]] = field(default_factory=dict)
    label: str | None = None

    @cached_property
    def idle(self) -> dict[str, int]:
        """The events of the idle functions (a pool thread spinning or waiting for work)."""
        idle: dict[str, int] = {}
        for name, costs in self.functions.items():
            if is_idle(name):
                for event, value in costs.items():
                    idle[event] = idle.get(event, 0) + value
        return idle

    @cached_property
    def work(self) -> dict[str, int]:
        """The totals without the idle functions: what the counted figures are made of."""
        idle = self.idle
        return {event: value - idle.get(event, 0) for event, value in self.totals.items()}


_NAMED = re.compile(r"^\((\d+)\)(?: (.*))?$")
_BUILD_KEY = re.compile(r"-[0-9a-f]{16}(?=\.so)")


def object_name(path: str) -> str:
    """An object file as two sides name it alike: its file name, without the build key in
    the fused op's cached library name (each venv builds its own copy)."""
    return _BUILD_KEY.sub("", os.path.basename(path))


def parse_callgrind(path: Path) -> CountedProfile:
    """Callgrind's output format (name compression, `calls=` lines whose next cost line is
    the callee's inclusive cost, not the caller's own): totals and exclusive costs per
    function, keyed `function [object file name]`."""
    names: dict[str, dict[str, str]] = {"ob": {}, "fn": {}}
    events: list[str] = []
    totals: dict[str, int] = {}
    functions: dict[str, dict[str, int]] = {}
    label = None
    ob = fn = ""
    skip_next = False
    with open(path, errors="replace") as fh:
        for line in fh:
            line = line.rstrip("\n")
            if not line:
                continue
            head = line[0]
            if head.isdigit() or head in "+-*":
                if skip_next:
                    skip_next = False
                    continue
                costs = line.split()[1:]
                key = f"{fn} [{object_name(ob)}]"
                into = functions.setdefault(key, {})
                for event, value in zip(events, costs):
                    into[event] = into.get(event, 0) + int(value)
                continue
            name, _, value = line.partition("=")
            table = {"ob": "ob", "cob": "ob", "fn": "fn", "cfn": "fn"}.get(name)
            if table is not None:  # a name is defined where it first appears, as a caller or a callee
                match = _NAMED.match(value)
                if match:
                    number, text = match.groups()
                    if text is not None:
                        names[table][number] = text
                    value = names[table].get(number, number)
                if name == "ob":
                    ob = value
                elif name == "fn":
                    fn = value
            elif name == "calls":
                skip_next = True
            elif line.startswith("events:"):
                events = line.split(":", 1)[1].split()
            elif line.startswith("totals:"):
                totals = dict(zip(events, map(int, line.split(":", 1)[1].split())))
            elif line.startswith("desc: Trigger: Client Request: "):
                label = line.split("Client Request: ", 1)[1]
    if not totals:  # older dumps carry only `summary:`; the functions add up to it
        totals = {e: sum(f.get(e, 0) for f in functions.values()) for e in events}
    return CountedProfile(events, totals, functions, label)


def per_example(profile: CountedProfile, examples: int, top: int = TOP_FUNCTIONS) -> dict:
    """The record's counted fields: the work's totals (idle functions left out) and its
    costliest functions, per example."""
    cycles = {name: estimated_cycles(costs) for name, costs in profile.functions.items() if not is_idle(name)}
    costliest = sorted(cycles, key=cycles.get, reverse=True)[:top]
    work = profile.work
    return {
        "instructions_per_example": work.get("Ir", 0) / examples,
        "cycles_per_example": estimated_cycles(work) / examples,
        "count_events": {event: value / examples for event, value in work.items()},
        "count_functions": {name: {"Ir": profile.functions[name].get("Ir", 0) / examples,
                                   "cycles": cycles[name] / examples} for name in costliest},
    }


def count_steps(shim: Shim, step: Callable, batches: Sequence, steps: int, label: str, offset: int = 0,
                sync: Callable = lambda result: result.numpy()) -> None:
    """`steps` train steps, each counted and dumped on its own (`label step i`): one step
    that does extra work (TensorFlow copies a variable's buffer on write when another
    reference to it is alive, which can depend on when a tensor was freed) must not move
    the cell's figure, so the cell is judged by its median step (`median_step`), and `ab`
    pairs step i of one side with step i of the other (same batch, same history).

    Python's cyclic collector runs when enough objects were allocated since its last run,
    so where a collection lands depends on everything the process did before: an A/A pair
    had one in a different step on each side (~150k instructions). A full collection before
    each step (not counted) starts every step from the same collector state."""
    for i in range(steps):
        gc.collect()
        shim.count(lambda i=i: sync(step(*batches[(offset + i) % len(batches)])), f"{label} step {i + 1}")


def dumps_of(folder: Path, pid: int) -> list[Path]:
    """Every dump this process wrote (`callgrind.<pid>.<n>`), in the order written."""
    dumps = []
    for path in folder.glob(f"callgrind.{pid}.*"):
        suffix = path.name.rsplit(".", 1)[-1]
        if suffix.isdigit():
            dumps.append((int(suffix), path))
    return [path for _, path in sorted(dumps)]


def median_step(profiles: Sequence[CountedProfile]) -> tuple[CountedProfile, list[int]]:
    """The step with the median instruction count of its work (and every step's count): a
    cell's counted figure that one unusual step cannot move."""
    ordered = sorted(profiles, key=lambda p: p.work.get("Ir", 0))
    return ordered[(len(ordered) - 1) // 2], [p.work.get("Ir", 0) for p in profiles]


def step_series(profiles: Sequence[CountedProfile]) -> dict[str, list]:
    """Every counted step's figures, in step order, for the record: `ab` pairs them across
    sides step by step."""
    return {"counted_step_instructions": [p.work.get("Ir", 0) for p in profiles],
            "counted_step_cycles": [estimated_cycles(p.work) for p in profiles],
            "counted_step_idle_instructions": [p.idle.get("Ir", 0) for p in profiles]}
