"""The worker process: `python -m sparsebench.train.worker --jobs JOBS --out DIR`.

It is the only place TensorFlow is imported. The orchestrator starts it with the cells'
environment (OMP/MKL/oneDNN variables are read when TensorFlow loads), the worker sets
TensorFlow's inter/intra-op threads before the runtime initializes, then for each cell:
generate data -> build model and optimizer -> warm up -> timed windows -> gradient
diagnostics -> held-out evaluation.

Results travel through files, not stdout, so library log noise cannot corrupt them: before
a cell starts the worker writes `DIR/<i>.started`; when it ends, `DIR/<i>.json` (written
to a temporary name and renamed, so a reader never sees half a record). A cell that raises
is recorded as `failed` with its error (`skipped` for a missing GPU) and the worker moves
on to the next cell; a crash of the process itself is noticed by the orchestrator.

`python -m sparsebench.train.worker --probe` prints TensorFlow's facts as one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import WORKER_PROTOCOL, stats
from ..errors import CellSkipped
from ..plan.cell import Cell, Threads
from ..plan.spec import CUSTOM_OP_VARIANTS
from .measure.tf_facts import tensorflow_info, threads_in_effect

_PROCESS_START = time.perf_counter()
INPUT_BOUND_MARGIN = 1.2  # a pipeline alone below this multiple of the training rate: input-bound
INPUT_WAIT_BOUND = 0.2  # or the timed steps waited this share of the windows for their batches
_PRIVATE_NETWORK = False  # set when the orchestrator started this worker in its own network namespace


def _private_network() -> bool:
    return _PRIVATE_NETWORK


def configure_threads(threads: Threads) -> dict[str, Any]:
    """Set TF's thread pools (before any op runs) and return the values in effect."""
    import tensorflow as tf

    if threads.intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads.intra_op_threads)
    if threads.inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(threads.inter_op_threads)
    return threads_in_effect()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


class Prepared:
    """A cell's data (generated before any timing) and its freshly built trainer."""

    def __init__(self, cell: Cell, build: bool = True):
        """`build=False`: data only (a parameter-server cell builds its trainer in the
        strategy's scope)."""
        import tensorflow as tf

        from .inputs.data import SyntheticData
        from .model.devices import resolve_device
        from .model.trainer import build_trainer, calibrate, to_sparse_tensor

        self.phases: dict[str, float] = {}
        t0 = time.perf_counter()
        self.device = resolve_device(cell.model.device)
        if cell.model.variant in CUSTOM_OP_VARIANTS:
            if cell.model.device != "cpu":
                raise CellSkipped("custom op has no GPU kernel", "fused_custom_op runs on the CPU only")
            from .custom_ops.build import load

            load()  # built by the parent before any cell started; loading takes milliseconds
            self.phases["custom_op_load_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
        self.num_features = cell.data.num_features
        self.data_facts: dict[str, Any] | None = None
        self.stream = None
        if cell.data.source is not None and cell.data.input == "pipeline":  # read inside the timed loop
            from .inputs import pipeline

            self.held_out, skip, self.data_facts, calibration_sample = pipeline.prepare(
                cell.data, cell.batch_size, cell.measure.eval_examples, cell.model.discretizer)
            self.pool = []
            self.dataset = lambda: pipeline.dataset(cell.data, cell.batch_size, skip)
            self.stream = pipeline.Stream(self.dataset())
        elif cell.data.source is not None:  # examples from files: the discretizer calibrates on them
            from .inputs.datafiles import cell_examples

            self.pool, self.held_out, train, self.data_facts = cell_examples(
                cell.data, cell.batch_size, cell.measure.batch_pool, cell.measure.eval_examples)
            calibration_sample = train.slice(0, min(train.batch_size, max(4 * cell.batch_size, 2048)))
        else:
            data = SyntheticData(cell.data)
            self.pool = data.batches(cell.batch_size, cell.measure.batch_pool, stream=0)
            self.held_out = data.held_out(cell.measure.eval_examples)
            calibration_sample = data.sample(max(4 * cell.batch_size, 2048), stream=5) if cell.model.discretizer else None
        calibration = calibrate(calibration_sample, cell.model.n_bin) if cell.model.discretizer else None
        with tf.device("/CPU:0"):
            self.batches = self.stream or [(to_sparse_tensor(b, self.num_features), tf.constant(b.labels))
                                           for b in self.pool]
            self.held_out_sp = to_sparse_tensor(self.held_out, self.num_features)
        self.calibration = calibration
        self.phases["data_s"] = time.perf_counter() - t0
        if build:
            t0 = time.perf_counter()
            self.trainer = build_trainer(cell.model, self.num_features, self.device, calibration)
            self.phases["build_s"] = time.perf_counter() - t0

    def variables_mb(self) -> dict[str, float]:
        return {v.name: v.shape.num_elements() * 4 / 2**20 for v in self.trainer.model.train_variables}


def _grad_type(trainer) -> str:
    grad_types = sorted(set(trainer.grad_types.values()))
    return grad_types[0] if len(grad_types) == 1 else ",".join(grad_types)


def measured_fields(measurement, losses: list[float]) -> dict[str, Any]:
    """A record's throughput, window and step-time fields, and its training loss."""
    throughput = stats.summarize_throughput(measurement.window_samples_per_sec)
    step_ms = stats.percentiles(np.array(measurement.step_seconds) * 1000.0)
    tail = losses[-max(1, min(20, len(losses))):] if losses else []
    return {
        "samples_per_sec": throughput["median"],
        "samples_per_sec_low": throughput["low"],
        "samples_per_sec_high": throughput["high"],
        "cv": throughput["cv"],
        "windows": measurement.window_samples_per_sec,
        "window_seconds": measurement.window_seconds,
        "window_steps": measurement.window_steps,
        "step_ms_p50": step_ms["p50"],
        "step_ms_p90": step_ms["p90"],
        "step_ms_p99": step_ms["p99"],
        "steps_timed": len(measurement.step_seconds),
        "loss": float(np.mean(tail)) if tail else None,
    }


def _windows_start(sampler, stream) -> None:
    """Between warm-up and the timed windows: start the GPU sampler, zero the input wait."""
    if sampler is not None:
        sampler.start()
    if stream is not None:
        stream.waited = 0.0


def run_cell(cell: Cell, isolation: str) -> dict[str, Any]:
    """Train and time one cell; returns its result record (status `ok`)."""
    import tensorflow as tf

    from .measure.gpumon import GpuSampler
    from .measure.windows import measure
    from .model.trainer import loss_fn

    prepared = Prepared(cell)
    trainer, batches, pool, held_out = prepared.trainer, prepared.batches, prepared.pool, prepared.held_out
    phases = prepared.phases

    losses: list[float] = []
    sampler = GpuSampler() if cell.model.device == "gpu" else None
    t0 = time.perf_counter()
    try:
        measurement = measure(
            trainer.train_step,
            batches,
            cell.batch_size,
            cell.measure,
            workers=cell.workers,
            sync=lambda loss: losses.append(float(loss)),
            on_windows_start=lambda: _windows_start(sampler, prepared.stream),
        )
    finally:
        if sampler is not None:
            sampler.stop()
    phases["warmup_s"] = measurement.warmup_seconds
    phases["measure_s"] = time.perf_counter() - t0 - measurement.warmup_seconds

    rows_touched = [int(trainer.gradient_stats(*batches[i % len(batches)])) for i in range(cell.measure.diagnostic_steps)]
    logits = trainer.predict_logits(prepared.held_out_sp)
    input_fields = {}
    if prepared.stream is not None:
        from .inputs.pipeline import input_alone

        wait_share = prepared.stream.waited / max(sum(measurement.window_seconds), 1e-9)
        _, seconds = cell.measure.window_limits()
        rates = input_alone(prepared.dataset(), cell.batch_size, seconds or 1.0, cell.measure.windows)
        alone = stats.summarize_throughput(rates)["median"]
        trained = stats.summarize_throughput(measurement.window_samples_per_sec)["median"]
        # Input-bound: the timed steps spent a fifth or more of the windows waiting for a
        # batch, or the pipeline alone delivers less than 1.2x what training consumed.
        input_fields = {"input_samples_per_sec": alone, "input_windows": rates, "input_wait_share": wait_share,
                        "input_bound": bool(wait_share >= INPUT_WAIT_BOUND or alone < INPUT_BOUND_MARGIN * trained)}
    record = {
        "status": "ok",
        "reason": None,
        "isolation": isolation,
        **measured_fields(measurement, losses),
        "eval_loss": float(loss_fn(logits, tf.constant(held_out.labels))),
        "auc": stats.auc(held_out.labels, logits.numpy()),
        "peak_rss_mb": peak_rss_mb(),
        "grad_type": _grad_type(trainer),
        "rows_touched": float(np.mean(rows_touched)) if rows_touched else None,
        "rows_touched_per_step": rows_touched,
        "num_features": prepared.num_features,
        "avg_nnz_per_batch": float(np.mean([b.nnz for b in pool])) if pool else None,
        "threads_in_effect": threads_in_effect(),
        "update_path": trainer.update_path,
        "phases": phases,
        "variables_mb": prepared.variables_mb(),
        "data_source": prepared.data_facts,
        **input_fields,
    }
    if sampler is not None:
        record.update(sampler.summary())
    return record


@contextlib.contextmanager
def ps_session(cell: Cell, remote: dict[str, Any] | None, cluster_dir: Path, fail_now: Callable[[str], None]):
    """The cell's data, its cluster and the training on it: yields (prepared, training,
    cluster spec, source, local cluster or None, watchdog or None).

    `remote`: `{"cluster": {...}, "source": FILE}` from `run --cluster`; otherwise a local
    cluster is started for the cell (in the worker's private network namespace, where the
    orchestrator made one) and stopped at the end, whatever happens. A PS task that dies
    mid-cell ends the cell at once through `fail_now`, naming the task."""
    from .ps.cluster import LocalCluster, Watchdog
    from .ps.distributed import PsTraining, check_supported
    from .model.trainer import build_trainer

    check_supported(cell)
    prepared = Prepared(cell, build=False)
    d = cell.distribution
    local = None
    if remote is not None:
        cluster, source = remote["cluster"], remote["source"]
        shape = (len(cluster["ps"]), len(cluster["worker"]))
        if shape != (d.ps_tasks, d.worker_tasks):
            raise CellSkipped("cluster shape differs",
                              f"the cell wants {d.ps_tasks} PS x {d.worker_tasks} worker tasks; {source} has "
                              f"{shape[0]} x {shape[1]}")
    else:
        local = LocalCluster(d.ps_tasks, d.worker_tasks, cluster_dir, threads={
            "intra_op_threads": cell.threads.intra_op_threads, "inter_op_threads": cell.threads.inter_op_threads})
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
        training = PsTraining(cell, cluster, prepared.pool, prepared.num_features,
                              build=lambda: build_trainer(cell.model, prepared.num_features, None, prepared.calibration))
        prepared.phases["build_s"] = time.perf_counter() - t0
        yield prepared, training, cluster, source, local, watchdog
    finally:
        if watchdog is not None:
            watchdog.stop()
        if local is not None:
            local.stop()


def run_ps_cell(cell: Cell, isolation: str, remote: dict[str, Any] | None, cluster_dir: Path,
                fail_now: Callable[[str], None]) -> dict[str, Any]:
    """Train and time one cell on a parameter-server cluster, this process coordinating."""
    import tensorflow as tf

    from .ps.distributed import cluster_record
    from .model.trainer import loss_fn

    with ps_session(cell, remote, cluster_dir, fail_now) as (prepared, training, cluster, source, local, watchdog):
        phases, held_out, d = prepared.phases, prepared.held_out, cell.distribution
        t0 = time.perf_counter()
        traffic: dict[str, Any] = {}

        def windows_start() -> None:
            if local is not None:
                traffic["before"] = local.ps_traffic()
                (cluster_dir / "windows-started").touch()  # beside the tasks' logs: tests wait for it

        measurement, losses = training.measure(cell.batch_size, on_windows_start=windows_start)
        if local is not None:
            traffic["after"] = local.ps_traffic()
        phases["warmup_s"] = measurement.warmup_seconds
        phases["measure_s"] = time.perf_counter() - t0 - measurement.warmup_seconds
        trainer = training.trainer
        logits = trainer.predict_logits(prepared.held_out_sp)
        lost = dict(watchdog.lost) if watchdog is not None else {}
        fields = measured_fields(measurement, losses)
        return {
            "status": "ok",
            "reason": None,
            "isolation": isolation,
            **fields,
            "samples_per_sec_per_worker_mean": fields["samples_per_sec"] / d.worker_tasks,
            "samples_per_sec_per_worker": training.per_worker_samples_per_sec,
            "eval_loss": float(loss_fn(logits, tf.constant(held_out.labels))),
            "auc": stats.auc(held_out.labels, logits.numpy()),
            "peak_rss_mb": peak_rss_mb(),
            "grad_type": _grad_type(trainer),
            "rows_touched": None,  # the diagnostic step is a local one; not run against a cluster
            "rows_touched_per_step": [],
            "num_features": prepared.num_features,
            "avg_nnz_per_batch": float(np.mean([b.nnz for b in prepared.pool])),
            "threads_in_effect": threads_in_effect(),
            "update_path": trainer.update_path,
            "phases": phases,
            "variables_mb": {v.name: v.shape.num_elements() * 4 / 2**20 for v in trainer.model.train_variables},
            "cluster": {**cluster_record(cell, cluster, source, local is not None and _private_network(), training,
                                         lost),
                        **ps_bytes_per_step(traffic, sum(measurement.window_steps))},
        }


def ps_bytes_per_step(traffic: dict[str, Any], steps: int) -> dict[str, Any]:
    """Each PS task's bytes sent and received per train step over the timed windows."""
    before, after = traffic.get("before"), traffic.get("after")
    if not before or not after or steps <= 0:
        why = "remote cluster" if not traffic else "ss (iproute2) is not installed"
        return {"ps_bytes_per_step": None, "ps_bytes_not_measured": why}
    return {"ps_bytes_per_step": {task: {kind: (after[task][kind] - before[task][kind]) / steps for kind in ("sent", "received")}
                                  for task in after}}


def profile_ps_cell(cell: Cell, isolation: str, steps: int, logdir: Path, remote: dict[str, Any] | None,
                    cluster_dir: Path, fail_now: Callable[[str], None]) -> dict[str, Any]:
    """Profile the coordinator of a PS cell: what it waits on, and the ops it runs itself.
    The tasks' own op times are not in this trace (TensorFlow's profiler traces one process)."""
    import tensorflow as tf

    from .measure import profiler as profile
    from .ps.distributed import cluster_record

    with ps_session(cell, remote, cluster_dir, fail_now) as (prepared, training, cluster, source, local, watchdog):
        k, workers = training.steps_per_execution, cell.distribution.worker_tasks
        training.schedule(max(workers, math.ceil(cell.measure.warmup_steps / k)))
        training.coordinator.join()
        functions = max(workers, math.ceil(steps / k))
        logdir.mkdir(parents=True, exist_ok=True)
        if local is not None:
            # Every task serves TensorFlow's profiler: trace them all while the functions run
            # (the trace lasts a little longer than the functions, measured untraced first).
            start = time.perf_counter()
            training.schedule(functions)
            training.coordinator.join()
            untraced = time.perf_counter() - start
            training.schedule(functions)
            tf.profiler.experimental.client.trace(",".join(local.profiler_addresses()), str(logdir),
                                                  duration_ms=max(500, int(1500 * untraced)))
            training.coordinator.join()
            elapsed, note = untraced, profile.PS_TASKS_NOTE
            host_names = {f"127.0.0.1_{port}": task for task, port in local.profiler_ports.items()}
        else:
            tf.profiler.experimental.start(str(logdir))
            start = time.perf_counter()
            try:
                training.schedule(functions)
                training.coordinator.join()
            finally:
                elapsed = time.perf_counter() - start
                tf.profiler.experimental.stop()
            note, host_names = profile.PS_COORDINATOR_NOTE, None
        done = functions * k
        summary = profile.write_outputs(logdir, cell.cell_id, done, 1000.0 * elapsed / done * workers, note=note,
                                        host_names=host_names)
        return profile_record(isolation, logdir, summary, training.trainer, prepared.phases,
                              cluster=cluster_record(cell, cluster, source, local is not None and _private_network(),
                                                     training, dict(watchdog.lost) if watchdog is not None else {}))


def profile_cell(cell: Cell, isolation: str, steps: int, logdir: Path) -> dict[str, Any]:
    """Warm up, then run `steps` steps under TensorFlow's profiler; write the op tables."""
    import tensorflow as tf

    from .measure import profiler as profile
    from .measure.hogwild import run_hogwild

    prepared = Prepared(cell)
    trainer, batches = prepared.trainer, prepared.batches
    sync = lambda loss: loss.numpy()  # noqa: E731 - each step completes before the next
    run_hogwild(trainer.train_step, batches, cell.workers, steps_per_worker=max(1, cell.measure.warmup_steps), sync=sync)
    logdir.mkdir(parents=True, exist_ok=True)
    steps_per_worker = max(1, steps // cell.workers)
    tf.profiler.experimental.start(str(logdir))
    start = time.perf_counter()
    try:
        run = run_hogwild(trainer.train_step, batches, cell.workers, steps_per_worker=steps_per_worker,
                          offset=cell.measure.warmup_steps, sync=sync)
    finally:
        elapsed = time.perf_counter() - start
        tf.profiler.experimental.stop()
    summary = profile.write_outputs(logdir, cell.cell_id, run.steps, 1000.0 * elapsed / run.steps * cell.workers,
                                    note=profile.GPU_HOST_TIME_NOTE if cell.model.device == "gpu" else None)
    record = profile_record(isolation, logdir, summary, trainer, prepared.phases, variables_mb=prepared.variables_mb())
    if cell.model.device == "gpu":
        record["gpu_peak_mb"] = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
    return record


def profile_record(isolation: str, logdir: Path, summary: dict[str, Any], trainer, phases: dict[str, float],
                   **extra: Any) -> dict[str, Any]:
    """A profiled cell's record: where its profile is, the op summary, and how it ran."""
    return {
        "status": "ok",
        "reason": None,
        "isolation": isolation,
        "profile_dir": str(logdir),
        "profile": summary,
        "peak_rss_mb": peak_rss_mb(),
        "grad_type": _grad_type(trainer),
        "update_path": trainer.update_path,
        "phases": phases,
        **extra,
    }


def _write_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        json.dump(payload, fh, allow_nan=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def run_jobs(jobs_path: Path, out_dir: Path) -> int:
    global _PRIVATE_NETWORK
    from ..lifetime import die_with_parent
    from .ps.cluster import bring_loopback_up

    die_with_parent()  # a kill -9 of the orchestrator takes this worker (and its cluster) with it
    job = json.loads(jobs_path.read_text())
    if job.get("private_network"):
        bring_loopback_up()
        _PRIVATE_NETWORK = True
    remote_cluster = job.get("cluster")  # {"cluster": {...}, "source": FILE} from `run --cluster`
    cells = [Cell.from_dict(c) for c in job["cells"]]
    first_index = job.get("first_index", 0)
    isolation = job.get("isolation", "cell")
    profiling = job.get("profile")  # {"steps": N, "dir": DIR} for `sparsebench profile`
    lockstep = job.get("lockstep", False)  # wait for the parent's <i>.go before each cell (sparsebench ab)
    if not cells:
        return 0
    startup = {"process_start_to_tf_s": None}
    t0 = time.perf_counter()
    import tensorflow as tf  # noqa: F401 - imported here, after the environment is in place

    effect = configure_threads(cells[0].threads)
    startup["process_start_to_tf_s"] = time.perf_counter() - _PROCESS_START
    startup["tf_import_s"] = time.perf_counter() - t0
    tf_facts = tensorflow_info()
    for offset, cell in enumerate(cells):
        index = first_index + offset
        while lockstep and not (out_dir / f"{index}.go").exists():
            time.sleep(0.002)
        (out_dir / f"{index}.started").write_text(str(time.time()))
        started = time.perf_counter()

        def fail_now(message: str, index: int = index, started: float = started) -> None:
            """From the cluster watchdog: record the cell failed and end the process (the
            coordinator may be waiting on a task that will never answer)."""
            _write_atomic(out_dir / f"{index}.json", {
                "status": "failed", "reason": message[:500], "tensorflow": tf_facts,
                "worker": {"pid": os.getpid(), "cell_seconds": time.perf_counter() - started}})
            os._exit(3)

        try:
            if not cell.distribution.is_local and not profiling:
                record = run_ps_cell(cell, isolation, remote_cluster, out_dir / f"cluster-{index}", fail_now)
            elif not cell.distribution.is_local:
                record = profile_ps_cell(cell, isolation, profiling["steps"], Path(profiling["dir"]) / cell.cell_id,
                                         remote_cluster, out_dir / f"cluster-{index}", fail_now)
            elif profiling:
                logdir = Path(profiling["dir"]) / cell.cell_id
                record = profile_cell(cell, isolation, profiling["steps"], logdir)
            else:
                record = run_cell(cell, isolation)
        except CellSkipped as exc:
            record = {"status": "skipped", "reason": exc.reason, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a failed cell is data, not a crash
            lines = [line for line in traceback.format_exception_only(type(exc), exc) if line.strip()]
            record = {"status": "failed", "reason": lines[-1].strip()[:500], "traceback": traceback.format_exc()}
        record["worker"] = {
            "pid": os.getpid(),
            "cell_seconds": time.perf_counter() - started,
            "cells_before_in_process": offset,
            "threads_requested": effect,
            **startup,
        }
        record["tensorflow"] = tf_facts
        _write_atomic(out_dir / f"{index}.json", record)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsebench.train.worker")
    parser.add_argument("--jobs", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--probe", action="store_true", help="print TensorFlow's facts as JSON")
    parser.add_argument("--protocol", action="store_true", help="print the worker protocol this version speaks")
    args = parser.parse_args(argv)
    if args.protocol:
        print(WORKER_PROTOCOL)
        return 0
    if args.probe:
        print(json.dumps(tensorflow_info()))
        return 0
    if args.jobs is None or args.out is None:
        parser.error("--jobs and --out are required")
    return run_jobs(args.jobs, args.out)


if __name__ == "__main__":
    sys.exit(main())
