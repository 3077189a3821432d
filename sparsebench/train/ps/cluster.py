"""A cell's parameter-server cluster: TensorFlow's own servers as processes, and their end.

`LocalCluster` starts `ps_tasks` parameter servers and `worker_tasks` workers, each a
`python -m sparsebench.train.ps.cluster_task` process serving on a free loopback port, for
the coordinator (the cell's worker process) to drive. They die with it: each task gets
SIGKILL as its parent-death signal, and `stop()` kills and reaps them (the orchestrator
kills the whole process group besides).

Why a private network: TensorFlow's gRPC servers listen on every interface and
authenticate nothing, so the orchestrator runs a local cluster's coordinator inside
`unshare --user --net` (a network namespace holding only loopback); `bring_loopback_up`
is the first thing the worker does there. Nothing outside the namespace can reach the
ports, and they vanish with it.

A remote cluster (`sparsebench run --cluster FILE`) is the user's: the file's task
addresses are used as they are, and nothing is started or stopped here.
"""

from __future__ import annotations

import fcntl
import json
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from ...lifetime import die_with_parent
from ...modules import module_command
from .cluster_task import CUSTOM_OP_EXIT

START_TIMEOUT_S = 60.0


def bring_loopback_up() -> None:
    """Set `lo` up in a fresh network namespace (SIOCSIFFLAGS), so 127.0.0.1 works there."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(sock, siocgifflags, request)[:18])[1]
        if not flags & iff_up:
            fcntl.ioctl(sock, siocsifflags, struct.pack("16sH", b"lo", flags | iff_up))


def free_loopback_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 right now (held together, then released)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def tcp_bytes_by_pid(pids: set[int]) -> dict[int, dict[str, int]] | None:
    """Bytes sent and received so far over the established TCP connections each process in
    `pids` holds (server and client sides: a PS task also pulls tensors from the workers
    over connections it opens), from the kernel's tcp_info as `ss -tinp` (iproute2) prints
    it; None where `ss` is not installed. Run in the cluster's network namespace, it sees
    exactly the cluster's connections."""
    try:
        out = subprocess.run(["ss", "-tinpH", "state", "established"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    totals = {pid: {"sent": 0, "received": 0} for pid in pids}
    owners: list[int] = []
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):  # a connection, with the processes holding it
            owners = [int(pid) for pid in _PID.findall(line) if int(pid) in totals]
            continue
        for item in line.split():  # its tcp_info line
            key, _, value = item.partition(":")
            if key in ("bytes_sent", "bytes_received") and value.isdigit():
                for pid in owners:
                    totals[pid]["sent" if key == "bytes_sent" else "received"] += int(value)
    return totals


_PID = re.compile(r"pid=(\d+)")


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


class TaskDied(RuntimeError):
    """A task of the cell's cluster is gone; the message names it."""


class LocalCluster:
    """PS and worker tasks on loopback for one cell, plus the chief's (coordinator's) address."""

    def __init__(self, ps_tasks: int, worker_tasks: int, log_dir: Path, threads: dict[str, int] | None = None,
                 python: str = sys.executable, custom_op: str | None = None):
        """`custom_op`: the fused op library's path, loaded by every task before its server
        starts (a task that cannot load it ends the start with `CustomOpUnavailable`)."""
        self.ps_tasks, self.worker_tasks = ps_tasks, worker_tasks
        self.custom_op = custom_op
        self.log_dir = log_dir
        self.threads = threads or {}
        self.python = python
        tasks = ps_tasks + worker_tasks
        ports = free_loopback_ports(1 + 2 * tasks)
        address = [f"127.0.0.1:{port}" for port in ports[:1 + tasks]]
        self.spec = {"chief": address[:1], "ps": address[1:1 + ps_tasks], "worker": address[1 + ps_tasks:]}
        self.profiler_ports = dict(zip(self.tasks, ports[1 + tasks:]))  # each task's profiler server
        self.processes: dict[str, subprocess.Popen] = {}

    @property
    def tasks(self) -> list[str]:
        return [f"{job}:{i}" for job in ("ps", "worker") for i in range(len(self.spec[job]))]

    def address(self, task: str) -> str:
        job, index = task.split(":")
        return self.spec[job][int(index)]

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start every task and wait until each one accepts connections."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        cluster = json.dumps(self.spec)
        for task in self.tasks:
            command = module_command(self.python, "sparsebench.train.ps.cluster_task", "--cluster", cluster, "--task", task,
                                     "--profiler-port", str(self.profiler_ports[task]))
            for name, value in self.threads.items():
                if value:
                    command += [f"--{name.replace('_', '-')}", str(value)]
            if self.custom_op is not None:
                command += ["--custom-op", self.custom_op]
            with open(self.log_dir / f"{task.replace(':', '-')}.log", "w") as log:
                self.processes[task] = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                                        stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout_s
        for task in self.tasks:
            host, port = self.address(task).rsplit(":", 1)
            while True:
                self.check()
                try:
                    with socket.create_connection((host, int(port)), timeout=1.0):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise TaskDied(f"{task} did not start listening within {timeout_s:g} s "
                                       f"(log: {self.log_path(task)})") from None
                    time.sleep(0.05)

    def ps_traffic(self) -> dict[str, dict[str, int]] | None:
        """Per PS task: bytes it has sent and received over its connections so far (None
        where `ss` is missing)."""
        pids = {self.processes[f"ps:{i}"].pid: f"ps:{i}" for i in range(self.ps_tasks)}
        totals = tcp_bytes_by_pid(set(pids))
        return None if totals is None else {pids[pid]: value for pid, value in totals.items()}

    def cpu_seconds(self) -> dict[str, float]:
        """Per task: user + system CPU seconds its process has used so far (tasks that
        ended are left out)."""
        import psutil

        seconds = {}
        for task, process in self.processes.items():
            try:
                seconds[task] = sum(psutil.Process(process.pid).cpu_times()[:2])
            except psutil.Error:
                pass
        return seconds

    def profiler_addresses(self) -> list[str]:
        return [f"grpc://127.0.0.1:{port}" for port in self.profiler_ports.values()]

    def log_path(self, task: str) -> Path:
        return self.log_dir / f"{task.replace(':', '-')}.log"

    def last_line(self, task: str) -> str | None:
        """The last line `task` wrote to its log, without the `sparsebench: error: ` prefix."""
        try:
            lines = [line for line in self.log_path(task).read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return None
        return lines[-1].removeprefix("sparsebench: error: ") if lines else None

    def dead(self) -> dict[str, str]:
        """Tasks whose process has ended: task -> how."""
        return {task: describe_exit(p.returncode) for task, p in self.processes.items() if p.poll() is not None}

    def check(self) -> None:
        for task, process in self.processes.items():
            if process.poll() == CUSTOM_OP_EXIT:
                from ..custom_ops.build import CustomOpUnavailable

                raise CustomOpUnavailable(self.last_line(task) or f"{task} cannot load the fused op library")
        dead = self.dead()
        if dead:
            raise TaskDied("; ".join(f"{task} {how}" for task, how in dead.items()))

    def pids(self) -> dict[str, int]:
        return {task: p.pid for task, p in self.processes.items()}

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
        for process in self.processes.values():
            process.wait()

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class Watchdog(threading.Thread):
    """Watches a local cluster's tasks while a cell trains.

    A parameter server that dies loses part of the model: `on_fatal(message)` is called at
    once (the worker records the cell `failed`, naming the task, and exits, because the
    coordinator may wait for a server that will never return). A worker task that dies is
    noted in `lost`; TensorFlow's coordinator reschedules its functions on the others. If
    every worker task dies, that is fatal too."""

    def __init__(self, cluster: LocalCluster, on_fatal: Callable[[str], None], interval_s: float = 0.1):
        super().__init__(name="cluster-watchdog", daemon=True)
        self.cluster = cluster
        self.on_fatal = on_fatal
        self.interval_s = interval_s
        self.lost: dict[str, str] = {}
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.wait(self.interval_s):
            dead = self.cluster.dead()
            ps = {task: how for task, how in dead.items() if task.startswith("ps:")}
            if ps:
                self.on_fatal("parameter server " + "; ".join(f"{task} {how}" for task, how in ps.items()))
                return
            self.lost.update({task: how for task, how in dead.items() if task.startswith("worker:")})
            if len(self.lost) == self.cluster.worker_tasks:
                self.on_fatal("every worker task died: " + "; ".join(f"{t} {h}" for t, h in self.lost.items()))
                return

    def stop(self) -> None:
        self._stop.set()
