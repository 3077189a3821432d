"""One parameter-server cell, this worker process coordinating: its input, its cluster
(started here, or the user's), the training on it, and its record.

A local cluster is started for the cell (inside the worker's private network namespace,
where the orchestrator made one) and stopped at the end, whatever happens; a PS task
that dies mid-cell ends the cell at once through `fail_now`, naming the task.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Callable

from ...errors import CellSkipped
from ...plan.cell import Cell
from ...plan.job import RemoteCluster
from ...plan.spec import CUSTOM_OP_VARIANTS
from ...record import Record
from ..cell import measured_fields, model_fields, prepare, profile_record, quality_fields
from ..custom_ops.build import loaded_library


@contextlib.contextmanager
def ps_session(cell: Cell, remote: RemoteCluster | None, cluster_dir: Path, fail_now: Callable[[str], None]):
    """The cell's data, its cluster and the training on it: yields (prepared, training,
    cluster spec, source, local cluster or None, watchdog or None)."""
    from ..model.trainer import build_trainer
    from .cluster import LocalCluster, Watchdog
    from .distributed import PsTraining

    fused = cell.model.variant in CUSTOM_OP_VARIANTS
    prepared = prepare(cell, build=False)  # a fused cell: the op library built and loaded here first
    d = cell.distribution
    local = None
    if remote is not None:
        cluster, source = remote.cluster, remote.source
        shape = (len(cluster["ps"]), len(cluster["worker"]))
        if shape != (d.ps_tasks, d.worker_tasks):
            raise CellSkipped("cluster shape differs",
                              f"the cell wants {d.ps_tasks} PS x {d.worker_tasks} worker tasks; {source} has "
                              f"{shape[0]} x {shape[1]}")
    else:
        local = LocalCluster(d.ps_tasks, d.worker_tasks, cluster_dir, threads={
            "intra_op_threads": cell.threads.intra_op_threads, "inter_op_threads": cell.threads.inter_op_threads},
            custom_op=loaded_library() if fused else None)
        cluster, source = local.spec, "local"
    watchdog = None
    try:
        if local is not None:
            t0 = time.perf_counter()
            local.start()
            prepared.phases["cluster_start_s"] = time.perf_counter() - t0
            watchdog = Watchdog(local, fail_now)
            watchdog.start()
        t0 = time.perf_counter()
        if fused:
            from .fused import ShardedFusedTrainer

            build = lambda: ShardedFusedTrainer(cell.model, prepared.input.num_features,  # noqa: E731
                                                len(cluster["ps"]), prepared.calibration)
        else:
            build = lambda: build_trainer(cell.model, prepared.input.num_features, None,  # noqa: E731
                                          prepared.calibration)
        training = PsTraining(cell, cluster, prepared.input.pool, prepared.input.num_features, build=build)
        prepared.trainer = training.trainer
        prepared.phases["build_s"] = time.perf_counter() - t0
        try:
            yield prepared, training, cluster, source, local, watchdog
        except Exception as exc:  # noqa: BLE001 - re-raised unless it is a task without the op library
            missing = op_missing_on_a_task(exc) if fused else None
            if missing is None:
                raise
            from ..custom_ops.build import CustomOpUnavailable

            raise CustomOpUnavailable(missing) from None
    finally:
        if watchdog is not None:
            watchdog.stop()
        if local is not None:
            local.stop()


def op_missing_on_a_task(exc: BaseException) -> str | None:
    """Why a fused cell cannot run on this cluster, where `exc` says a task has not loaded
    the fused op library (TensorFlow: "Op type not registered 'SparsebenchFused...' in
    binary running on HOST"); None for any other error."""
    text = str(getattr(exc, "message", None) or exc)
    if "not registered" not in text or "Sparsebench" not in text:
        return None
    line = next((line for line in text.splitlines() if "not registered" in line), text).strip()
    return (f"a task of the cluster has not loaded the fused op library ({line[:200]}); start every task with "
            f"`sparsebench serve --custom-op try` (or PATH) on a machine where the op builds")


def run_ps_cell(cell: Cell, *, round: int, isolation: str, remote: RemoteCluster | None, private_network: bool,
                cluster_dir: Path, fail_now: Callable[[str], None]) -> Record:
    """Train and time one cell on a parameter-server cluster; its record (status ok)."""
    from .distributed import cluster_record

    with ps_session(cell, remote, cluster_dir, fail_now) as (prepared, training, cluster, source, local, watchdog):
        phases, d = prepared.phases, cell.distribution
        t0 = time.perf_counter()
        quality = quality_fields(prepared, *training.train_steps(cell.measure.quality_steps))
        phases["quality_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        traffic: dict[str, Any] = {}

        def windows_start() -> None:
            if local is not None:
                traffic["before"] = local.ps_traffic()
                (cluster_dir / "windows-started").touch()  # beside the tasks' logs: tests wait for it

        measurement = training.measure(cell.batch_size, on_windows_start=windows_start)
        if local is not None:
            traffic["after"] = local.ps_traffic()
        phases["warmup_s"] = measurement.warmup_seconds
        phases["measure_s"] = time.perf_counter() - t0 - measurement.warmup_seconds
        lost = dict(watchdog.lost) if watchdog is not None else {}
        fields = measured_fields(measurement)
        cluster_facts = {**cluster_record(cell, cluster, source, local is not None and private_network, training, lost),
                         **ps_bytes_per_step(traffic, sum(measurement.window_steps))}
        return Record.new(
            cell, round, "ok", isolation=isolation, **fields, **quality, **model_fields(prepared),
            samples_per_sec_per_worker_mean=fields["samples_per_sec"] / d.worker_tasks,
            samples_per_sec_per_worker=training.per_worker_samples_per_sec,
            # rows_touched: the diagnostic step is a local one; it is not run against a cluster
            cluster=cluster_facts, bound_reason=PS_BOUND_REASON)


COSTS_MIN_SECONDS = 2.0  # CPU times come in 10 ms ticks: a short span would read as steps


def task_costs(local, training, functions: int, min_seconds: float = COSTS_MIN_SECONDS) -> dict[str, Any]:
    """What one train step costs each task of a local cluster, untraced: CPU ms per step of
    each task's process (and of this one, the coordinator) and each PS task's bytes per
    step, over rounds of `functions` functions lasting at least `min_seconds` together.
    The figures `report --view projection` rests on."""
    traffic = {"before": local.ps_traffic()}
    cpu_before, chief_before = local.cpu_seconds(), time.process_time()
    start, steps = time.perf_counter(), 0
    while steps == 0 or time.perf_counter() - start < min_seconds:
        training.schedule(functions)
        training.coordinator.join()
        steps += functions * training.steps_per_execution
    seconds = time.perf_counter() - start
    chief_cpu, cpu_after, traffic["after"] = time.process_time() - chief_before, local.cpu_seconds(), local.ps_traffic()
    return {**ps_bytes_per_step(traffic, steps),
            "cpu_ms_per_step": {"chief": 1000.0 * chief_cpu / steps,
                                **{task: 1000.0 * (cpu_after[task] - cpu_before[task]) / steps
                                   for task in cpu_after if task in cpu_before}},
            "costs_seconds": seconds, "costs_steps": steps}


PS_BOUND_REASON = "parameter-server cells move rows over the network, which the memory bound does not model"


def ps_bytes_per_step(traffic: dict[str, Any], steps: int) -> dict[str, Any]:
    """Each PS task's bytes sent and received per train step over the timed windows."""
    before, after = traffic.get("before"), traffic.get("after")
    if not before or not after or steps <= 0:
        why = "remote cluster" if not traffic else "ss (iproute2) is not installed"
        return {"ps_bytes_per_step": None, "ps_bytes_not_measured": why}
    return {"ps_bytes_per_step": {task: {kind: (after[task][kind] - before[task][kind]) / steps for kind in ("sent", "received")}
                                  for task in after}}


def profile_ps_cell(cell: Cell, *, round: int, isolation: str, steps: int, logdir: Path, remote: RemoteCluster | None,
                    private_network: bool, cluster_dir: Path, fail_now: Callable[[str], None]) -> Record:
    """Profile a PS cell: every task of a local cluster (they all serve TensorFlow's
    profiler), or only the coordinator of a remote one."""
    import tensorflow as tf

    from ..measure import profiler
    from .distributed import cluster_record

    with ps_session(cell, remote, cluster_dir, fail_now) as (prepared, training, cluster, source, local, watchdog):
        k, workers = training.steps_per_execution, cell.distribution.worker_tasks
        training.schedule(max(workers, math.ceil(cell.measure.warmup_steps / k)))
        training.coordinator.join()
        functions = max(workers, math.ceil(steps / k))
        logdir.mkdir(parents=True, exist_ok=True)
        if local is not None:
            # Trace every task while the functions run (the trace lasts a little longer than
            # the functions, measured untraced first).
            start = time.perf_counter()
            training.schedule(functions)
            training.coordinator.join()
            untraced = time.perf_counter() - start
            costs = task_costs(local, training, functions)
            training.schedule(functions)
            tf.profiler.experimental.client.trace(",".join(local.profiler_addresses()), str(logdir),
                                                  duration_ms=max(500, int(1500 * untraced)))
            training.coordinator.join()
            elapsed, note = untraced, profiler.PS_TASKS_NOTE
            host_names = {f"127.0.0.1_{port}": task for task, port in local.profiler_ports.items()}
        else:
            costs = {}
            tf.profiler.experimental.start(str(logdir))
            start = time.perf_counter()
            try:
                training.schedule(functions)
                training.coordinator.join()
            finally:
                elapsed = time.perf_counter() - start
                tf.profiler.experimental.stop()
            note, host_names = profiler.PS_COORDINATOR_NOTE, None
        done = functions * k
        summary = profiler.write_outputs(logdir, cell.cell_id, done, 1000.0 * elapsed / done * workers, note=note,
                                         host_names=host_names)
        lost = dict(watchdog.lost) if watchdog is not None else {}
        return profile_record(cell, round, isolation, logdir, summary, prepared,
                              cluster={**cluster_record(cell, cluster, source, local is not None and private_network,
                                                        training, lost), **costs})
