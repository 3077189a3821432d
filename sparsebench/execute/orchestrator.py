"""Runs cells in worker processes and records each result the moment it exists.

The parent never imports TensorFlow. For each group of cells (one cell per group by
default; with isolation "env", consecutive cells whose process settings are equal) it
starts `python -m sparsebench.train.worker` with an environment built from a whitelist of the
parent's variables plus the cell's own (OMP/MKL/KMP, oneDNN, CUDA_VISIBLE_DEVICES), then
watches the worker's result folder:

- each `<i>.json` that appears becomes a record, appended to the results file at once;
- a cell running longer than its `timeout_s` gets its worker killed (the whole process
  group) and a `timeout` record;
- a worker that dies (a crash, `kill -9`, out of memory) gets a `failed` record for the
  cell it was running, with its exit status and last line of stderr;
- either way the rest of the group continues in a fresh worker.

Ctrl-C kills the running worker and propagates; every record already written stays.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..modules import module_command
from ..lifetime import UNSHARE, die_with_parent, exposed_opt_in
from ..plan.cell import Cell
from ..plan.job import BoundRequest, CountRequest, Job, ProfileRequest, RemoteCluster
from ..record import Record
from .counting import VALGRIND_SLOWDOWN, valgrind_prefix

# Passed through from the parent's environment (pyperf's approach): enough to find Python,
# the package and the GPU driver, nothing that silently changes threading.
ENV_WHITELIST = (
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "TMPDIR", "TEMP", "TMP", "PYTHONPATH", "PYTHONHOME",
    "VIRTUAL_ENV", "LD_LIBRARY_PATH", "CUDA_HOME", "CUDA_PATH", "CUDA_VISIBLE_DEVICES", "SYSTEMROOT",
    # the custom-op builder keys its cache on these: a worker must find the library the run's
    # header names (`sparsebench ops build` ran with them)
    "XDG_CACHE_HOME", "CXX",
)
ENV_PREFIXES = ("LC_", "NVIDIA_", "XLA_", "TF_", "OPENBLAS_", "SPARSEBENCH_", "GLIBC_")
# Prefixes of variables that change what TensorFlow does: passed on, and recorded in the
# run's fingerprint so that two runs made under different ones are told apart.
FRAMEWORK_PREFIXES = ("TF_", "XLA_", "OPENBLAS_", "GLIBC_")
# What every worker gets unless the parent sets the variable itself (recorded like the
# inherited ones). glibc.malloc.hugetlb=1: glibc's malloc asks for transparent huge pages
# on the chunks it maps, so a 200 MB table is not spread over 51,200 4 KB pages whose TLB
# misses every scattered row access pays (glibc >= 2.35 and THP in "madvise" or "always"
# mode; elsewhere it does nothing). Measured by an `ab` of 5 rounds (README: The fused custom
# op): the fused layer at batch 1024, SGD +14.5%, Lazy Adam +5.7%. A GLIBC_TUNABLES of the
# user's replaces it (glibc.malloc.hugetlb=0 turns huge pages off).
WORKER_DEFAULTS = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
# Settings a cell owns (its threads and oneDNN axes): the parent's values never reach a
# worker, or a cell left at "TensorFlow's default" would silently run with them.
CELL_OWNED = ("TF_ENABLE_ONEDNN_OPTS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS",
              "OMP_NUM_THREADS", "MKL_NUM_THREADS", "KMP_BLOCKTIME")

POLL_S = 0.05
EXIT_GRACE_S = 30.0  # a worker that finished its cells but does not exit is killed after this
READY_WAIT_S = 300.0  # how long a gated first cell waits for its worker to say it started


def _with_defaults(parent: dict[str, str]) -> dict[str, str]:
    """The parent's variables, and WORKER_DEFAULTS where the parent does not set them."""
    return {**WORKER_DEFAULTS, **parent}


def worker_environment(cell: Cell, parent: dict[str, str] | None = None) -> dict[str, str]:
    parent = _with_defaults(os.environ if parent is None else parent)
    env = {k: v for k, v in parent.items()
           if (k in ENV_WHITELIST or k.startswith(ENV_PREFIXES)) and k not in CELL_OWNED}
    env.update(cell.environment())
    env["PYTHONUNBUFFERED"] = "1"
    return env


def inherited_variables(parent: dict[str, str] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """(framework variables every worker inherits or gets by default, cell-owned variables
    that are dropped)."""
    parent = os.environ if parent is None else parent
    given = _with_defaults(parent)
    passed = {k: v for k, v in sorted(given.items()) if k.startswith(FRAMEWORK_PREFIXES) and k not in CELL_OWNED}
    dropped = {k: v for k, v in sorted(parent.items()) if k in CELL_OWNED}
    return passed, dropped


def groups_of(cells: list[Cell], isolation: str) -> list[list[Cell]]:
    """Consecutive cells sharing a process key form a group under isolation "env";
    a parameter-server cell always has its worker (and its cluster) to itself."""
    if isolation != "env":
        return [[c] for c in cells]
    groups: list[list[Cell]] = []
    for cell in cells:
        if (groups and groups[-1][0].process_key() == cell.process_key() and cell.distribution.is_local
                and groups[-1][0].distribution.is_local):
            groups[-1].append(cell)
        else:
            groups.append([cell])
    return groups


@dataclass
class Outcome:
    cell: Cell
    record: Record


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"worker killed by {name}"
    return f"worker exited with code {returncode}"


def last_line(path: Path) -> str:
    """The last non-empty line of a log (what a failed process said last), or ''."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def worker_record(cell: Cell, round: int, payload: dict[str, Any]) -> Record:
    """The record a worker wrote for `cell`. A worker of this version writes a whole
    `Record`; one of an older sparsebench (`ab --a-python`) writes only what it measured,
    and the cell's identity is added here."""
    if "cell_id" not in payload:
        payload = {"cell_id": cell.cell_id, "axes": cell.axes(), "cell": cell.to_dict(), **payload}
    return Record.from_dict({**payload, "round": round, "recorded_at": payload.get("recorded_at") or time.time()})


class Orchestrator:
    def __init__(
        self,
        *,
        record: Callable[[Outcome], None],
        isolation: str = "cell",
        python: str = sys.executable,
        on_start: Callable[[Cell], None] = lambda cell: None,
        on_phase: Callable[[Cell, str], None] | None = None,
        worker_log: Callable[[str], None] | None = None,
        cluster: RemoteCluster | None = None,
        profile: ProfileRequest | None = None,
        gate: Callable[[Cell], None] | None = None,
        count: CountRequest | None = None,
        on_ready: Callable[[], None] | None = None,
        bound: BoundRequest | None = None,
        before_spawn: Callable[[list[Cell]], None] | None = None,
        turn: Callable[[Cell], None] | None = None,
        after_worker: Callable[[], None] | None = None,
    ):
        """`cluster`: a real cluster the parameter-server cells run against; `profile`:
        profile the cells instead of timing them (`sparsebench profile`).

        `gate(cell)`, where given, blocks until the cell may start: the worker (already
        started, TensorFlow imported) waits for it, and the cell's clock starts when the
        gate opens (`sparsebench ab` uses it to alternate two sides cell by cell).

        `before_spawn(cells)`, where given, blocks until a worker for `cells` may start;
        `turn(cell)` until a cell that has prepared (its worker wrote `<i>.prepared`) may be
        timed: `ab` lets the sides prepare side by side and times one at a time. The wait
        for a turn does not count against the cell's timeout. `after_worker()` is called
        once a worker has exited (and been reaped)."""
        self.record = record
        self.isolation = isolation
        self.python = python
        self.on_start = on_start
        self.on_phase = on_phase  # where given: called at every poll with what the running cell's worker does
        self.worker_log = worker_log  # `run -v`: each line the worker prints, as it prints it
        self.cluster = cluster
        self.profile = profile
        self.gate = gate
        self.count = count  # count instructions under callgrind instead of timing (ab --count)
        self.bound = bound  # measure the memory bound only (sparsebench bound)
        self.on_ready = on_ready  # with a gate: called once the worker has started, before its first cell
        self.before_spawn = before_spawn
        self.turn = turn
        self.after_worker = after_worker
        self._process: subprocess.Popen | None = None
        self._round = 1
        # A parameter-server cell's worker starts its cluster: in a private network
        # namespace unless a remote cluster is given or the user opted out (the runner
        # checked that one can be made before any cell ran).
        self.private_network = cluster is None and not exposed_opt_in()

    def run(self, cells: list[Cell], round: int = 1) -> None:
        """Run `cells` once each, in fresh worker processes; their records say `round`."""
        self._round = round
        for group in groups_of(cells, self.isolation):
            remaining = list(group)
            while remaining:
                remaining = self._run_worker(remaining)

    def _run_worker(self, cells: list[Cell]) -> list[Cell]:
        """Run `cells` in one worker; return the cells still to run (after a kill or crash)."""
        with tempfile.TemporaryDirectory(prefix="sparsebench-") as tmp:
            tmp_path = Path(tmp)
            jobs = tmp_path / "jobs.json"
            private = self.private_network and not cells[0].distribution.is_local
            Job(cells=tuple(cells), isolation=self.isolation, round=self._round, lockstep=self.gate is not None,
                private_network=private, cluster=self.cluster, profile=self.profile, count=self.count,
                bound=self.bound).write(jobs)
            stderr_path = tmp_path / "worker.log"
            prefix = UNSHARE if private else []
            env = worker_environment(cells[0])
            if self.before_spawn is not None:
                self.before_spawn(cells)
            if self.count is not None:
                prefix = [*prefix, *valgrind_prefix(Path(self.count.folder))]
                env["PYTHONHASHSEED"] = "0"  # the same dict orders, the same instructions, every run
            with open(stderr_path, "w") as log:
                self._process = subprocess.Popen(
                    [*prefix, *module_command(self.python, "sparsebench.train.worker", "--jobs", str(jobs), "--out", str(tmp_path))],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group: a kill takes its children too
                    preexec_fn=die_with_parent,  # and a kill -9 of this process takes the worker
                )
                try:
                    return self._watch(cells, tmp_path, stderr_path)
                finally:
                    self.kill()
                    if self.after_worker is not None:
                        self.after_worker()

    def _release(self, cell: Cell, folder: Path, index: int) -> None:
        """Let cell `index` start: after its turn comes (with a gate), say so to the worker.
        With a gate, the first cell also waits until the worker has started (TensorFlow
        imported: `ready`), so that `ab`'s other side is not timed while this side's
        worker still spends a core starting up."""
        if self.gate is not None:
            if index == 0:
                self._wait_ready(folder)
            self.gate(cell)
            (folder / f"{index}.go").write_text("")
        self.on_start(cell)

    def _wait_ready(self, folder: Path) -> None:
        """Until the worker says it started, it exits, or READY_WAIT_S pass; then `on_ready`."""
        deadline = time.monotonic() + READY_WAIT_S
        while not (folder / "ready").exists() and time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                break
            time.sleep(POLL_S)
        if self.on_ready is not None:
            self.on_ready()

    def _phase(self, folder: Path) -> str:
        """What the worker says it does (train/measure/phase.py); before it is ready, its start-up."""
        if not (folder / "ready").exists():
            return "starting the worker (importing TensorFlow)"
        try:
            return (folder / "phase").read_text().strip() or "running"
        except OSError:
            return "running"

    def _stream_log(self, log: Path, offset: int) -> int:
        """`run -v`: the worker log's lines written since `offset`; returns the new offset."""
        if self.worker_log is None:
            return offset
        try:
            with open(log, "rb") as fh:
                fh.seek(offset)
                chunk = fh.read()
        except OSError:
            return offset
        complete = chunk[:chunk.rfind(b"\n") + 1]
        for line in complete.decode(errors="replace").splitlines():
            self.worker_log(line)
        return offset + len(complete)

    def _watch(self, cells: list[Cell], folder: Path, log: Path) -> list[Cell]:
        index = 0
        self._release(cells[0], folder, index)
        clock_start = time.monotonic()  # without a gate, the first cell's clock includes process start-up
        log_offset = 0
        timed: set[int] = set()  # cells whose turn to be timed was given
        while True:
            log_offset = self._stream_log(log, log_offset)
            if self.on_phase is not None:  # no reads of the phase file in the poll loop unless someone shows it
                self.on_phase(cells[index], self._phase(folder))
            if self.turn is not None and index not in timed and (folder / f"{index}.prepared").exists():
                waited = time.monotonic()
                self.turn(cells[index])
                (folder / f"{index}.time").write_text("")
                timed.add(index)
                clock_start += time.monotonic() - waited
            result_file = folder / f"{index}.json"
            if result_file.exists():
                payload = json.loads(result_file.read_text())
                self.record(Outcome(cells[index], worker_record(cells[index], self._round, payload)))
                index += 1
                if index == len(cells):
                    try:
                        self._process.wait(timeout=EXIT_GRACE_S)
                    except subprocess.TimeoutExpired:
                        pass  # every record is saved; `finally` kills the straggler
                    self._stream_log(log, log_offset)
                    return []
                self._release(cells[index], folder, index)
                clock_start = time.monotonic()
                continue
            cell = cells[index]
            returncode = self._process.poll()
            if returncode is not None:
                if result_file.exists():  # written just before exit
                    continue
                log_offset = self._stream_log(log, log_offset)
                reason = _describe_exit(returncode)
                detail = last_line(log)
                self.record(Outcome(cell, Record.new(cell, self._round, "failed",
                                                     f"{reason}: {detail}" if detail else reason)))
                return cells[index + 1 :]
            timeout = cell.measure.timeout_s * (VALGRIND_SLOWDOWN if self.count is not None else 1)
            if time.monotonic() - clock_start > timeout:
                self.kill()
                self.record(Outcome(cell, Record.new(cell, self._round, "timeout", f"no result after {timeout:g} s")))
                return cells[index + 1 :]
            time.sleep(POLL_S)

    def kill(self) -> None:
        """Kill the running worker's process group (if any) and reap it."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
