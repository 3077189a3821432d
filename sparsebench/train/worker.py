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
import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from .. import WORKER_PROTOCOL, stats
from ..errors import CellSkipped
from ..plan.cell import Cell, Threads
from ..plan.spec import CUSTOM_OP_VARIANTS
from .tf_facts import tensorflow_info, threads_in_effect

_PROCESS_START = time.perf_counter()


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

    def __init__(self, cell: Cell):
        import tensorflow as tf

        from .data import SyntheticData
        from .devices import resolve_device
        from .model import build_trainer, calibrate, to_sparse_tensor

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
        data = SyntheticData(cell.data)
        self.pool = data.batches(cell.batch_size, cell.measure.batch_pool, stream=0)
        self.held_out = data.held_out(cell.measure.eval_examples)
        calibration = (
            calibrate(data.sample(max(4 * cell.batch_size, 2048), stream=5), cell.model.n_bin)
            if cell.model.discretizer else None
        )
        with tf.device("/CPU:0"):
            self.batches = [(to_sparse_tensor(b, data.num_features), tf.constant(b.labels)) for b in self.pool]
            self.held_out_sp = to_sparse_tensor(self.held_out, data.num_features)
        self.num_features = data.num_features
        self.phases["data_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.trainer = build_trainer(cell.model, data.num_features, self.device, calibration)
        self.phases["build_s"] = time.perf_counter() - t0

    def variables_mb(self) -> dict[str, float]:
        return {v.name: v.shape.num_elements() * 4 / 2**20 for v in self.trainer.model.train_variables}


def run_cell(cell: Cell, isolation: str) -> dict[str, Any]:
    """Train and time one cell; returns its result record (status `ok`)."""
    import tensorflow as tf

    from .gpumon import GpuSampler
    from .measure import measure
    from .model import loss_fn

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
            on_windows_start=sampler.start if sampler is not None else lambda: None,
        )
    finally:
        if sampler is not None:
            sampler.stop()
    phases["warmup_s"] = measurement.warmup_seconds
    phases["measure_s"] = time.perf_counter() - t0 - measurement.warmup_seconds

    rows_touched = [int(trainer.gradient_stats(*batches[i % len(batches)])) for i in range(cell.measure.diagnostic_steps)]
    logits = trainer.predict_logits(prepared.held_out_sp)
    eval_loss = float(loss_fn(logits, tf.constant(held_out.labels)))
    throughput = stats.summarize_throughput(measurement.window_samples_per_sec)
    step_ms = stats.percentiles(np.array(measurement.step_seconds) * 1000.0)
    grad_types = sorted(set(trainer.grad_types.values()))
    tail = losses[-max(1, min(20, len(losses))):] if losses else []
    record = {
        "status": "ok",
        "reason": None,
        "isolation": isolation,
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
        "eval_loss": eval_loss,
        "auc": stats.auc(held_out.labels, logits.numpy()),
        "peak_rss_mb": peak_rss_mb(),
        "grad_type": grad_types[0] if len(grad_types) == 1 else ",".join(grad_types),
        "rows_touched": float(np.mean(rows_touched)) if rows_touched else None,
        "rows_touched_per_step": rows_touched,
        "num_features": prepared.num_features,
        "avg_nnz_per_batch": float(np.mean([b.nnz for b in pool])),
        "threads_in_effect": threads_in_effect(),
        "update_path": trainer.update_path,
        "phases": phases,
        "variables_mb": prepared.variables_mb(),
    }
    if sampler is not None:
        record.update(sampler.summary())
    return record


def profile_cell(cell: Cell, isolation: str, steps: int, logdir: Path) -> dict[str, Any]:
    """Warm up, then run `steps` steps under TensorFlow's profiler; write the op tables."""
    import tensorflow as tf

    from . import profiler as profile
    from .hogwild import run_hogwild

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
    record = {
        "status": "ok",
        "reason": None,
        "isolation": isolation,
        "profile_dir": str(logdir),
        "profile": summary,
        "peak_rss_mb": peak_rss_mb(),
        "variables_mb": prepared.variables_mb(),
        "grad_type": ",".join(sorted(set(trainer.grad_types.values()))),
        "update_path": trainer.update_path,
        "phases": prepared.phases,
    }
    if cell.model.device == "gpu":
        record["gpu_peak_mb"] = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
    return record


def _write_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        json.dump(payload, fh, allow_nan=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def run_jobs(jobs_path: Path, out_dir: Path) -> int:
    job = json.loads(jobs_path.read_text())
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
        try:
            if profiling:
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
