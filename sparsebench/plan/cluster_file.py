"""Cluster descriptions for parameter-server cells, read without TensorFlow.

A cluster is `{job: ["host:port", ...]}` with jobs `ps`, `worker` and, for the machine that
coordinates (`sparsebench run --cluster FILE`), `chief`: the same shape as the `cluster`
part of TensorFlow's `TF_CONFIG`, which is accepted whole as well.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path

from ..errors import ConfigError

JOBS = ("chief", "ps", "worker")
SERVED_JOBS = ("ps", "worker")


def read_cluster(text_or_path: str) -> dict[str, list[str]]:
    """{job: [host:port, ...]} from JSON text or a JSON file, TF_CONFIG-style or bare."""
    source, text = "--cluster", text_or_path
    if not text_or_path.lstrip().startswith("{"):
        path = Path(text_or_path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read cluster file: {exc.strerror or exc}") from None
        source = str(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: not JSON: {exc}") from None
    return validate_cluster(data.get("cluster", data) if isinstance(data, dict) else data, source)


def validate_cluster(cluster, source: str) -> dict[str, list[str]]:
    if not isinstance(cluster, dict) or not cluster:
        raise ConfigError(f'{source}: expected {{"ps": ["host:port", ...], "worker": [...], "chief": [...]}}')
    for job, addresses in cluster.items():
        if job not in JOBS:
            raise ConfigError(f"{source}: job {job!r}: unknown; jobs are {', '.join(JOBS)}")
        if not isinstance(addresses, list) or not addresses or not all(
                isinstance(a, str) and a.rpartition(":")[2].isdigit() for a in addresses):
            raise ConfigError(f'{source}: job {job!r}: expected a non-empty list of "host:port"')
    for job in SERVED_JOBS:
        if job not in cluster:
            raise ConfigError(f"{source}: no {job!r} job")
    return cluster


def parse_task(task: str, cluster: dict[str, list[str]]) -> tuple[str, int]:
    job, _, index = task.partition(":")
    if job not in SERVED_JOBS or not index.isdigit():
        raise ConfigError(f"--task {task!r}: expected ps:N or worker:N")
    if int(index) >= len(cluster.get(job, [])):
        raise ConfigError(f"--task {task}: the cluster has {len(cluster.get(job, []))} {job} task(s)")
    return job, int(index)


def from_tf_config(environ=os.environ) -> tuple[dict[str, list[str]], str]:
    """(cluster, "job:index") from TF_CONFIG."""
    raw = environ.get("TF_CONFIG")
    if not raw:
        raise ConfigError("no cluster: give --cluster FILE --task ps:N, or set TF_CONFIG")
    try:
        config = json.loads(raw)
        cluster, task = config["cluster"], config["task"]
        return validate_cluster(cluster, "TF_CONFIG"), f"{task['type']}:{int(task['index'])}"
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f'TF_CONFIG: expected {{"cluster": {{...}}, "task": {{"type": ..., "index": ...}}}} ({exc})') from None


def coordinator_cluster(cluster: dict[str, list[str]], source: str) -> dict[str, list[str]]:
    """A cluster the cells' coordinator can join: it needs exactly one `chief` address,
    this machine's, reachable from the tasks."""
    if len(cluster.get("chief", [])) != 1:
        raise ConfigError(f'{source}: needs "chief": ["this-host:port"], the address the coordinator serves at')
    return cluster


def port_in_use(port: int) -> bool:
    """Whether a server could not listen on `port` on every interface, as TensorFlow's gRPC
    server does (checked first: gRPC's own failure is twenty lines ending in "Could not start")."""
    for family, address in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind((address, port))
            return False
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            # no IPv6 on this machine: try IPv4
    return False


def check_ports_free(cluster: dict[str, list[str]], job: str, index: int, profiler_port: int = 0) -> None:
    """The ports task `job:index` will listen on are free here (ConfigError naming one that is not)."""
    address = cluster[job][index]
    port = address.rsplit(":", 1)[-1]
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{job}:{index}: address {address!r} has no port (host:port)")
    for what, number in ((f"{job}:{index} at {address}", int(port)), ("the profiler", profiler_port)):
        if number and port_in_use(number):
            raise ConfigError(f"port {number} ({what}) is in use by another process on this machine")
