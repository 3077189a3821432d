"""One local cell, from its input to its record.

`run_cell`: open the cell's input (`inputs.open_input`), build the model and optimizer,
train the quality phase (`quality_steps` steps from the initial weights, then the held-out
evaluation: every cell's loss and AUC rest on the same steps), warm up, time the windows,
then, outside the timing, the diagnostic steps (gradient type, rows touched).
`profile_cell`: the same cell's steps under TensorFlow's profiler instead of windows.

The record's fields are gathered by a few functions shared with parameter-server cells
(`ps/cell.py`), so both kinds of cell say the same things the same way.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import stats
from ..errors import CellSkipped, ConfigError
from ..plan.cell import Cell
from ..plan.spec import CUSTOM_OP_VARIANTS
from ..record import Record, input_bound_verdict, process_rate
from .inputs.open import CellInput, open_input
from .measure.tf_facts import threads_in_effect
from .measure import phase


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def huge_pages_mb() -> float | None:
    """The process's anonymous memory backed by transparent huge pages now (Linux
    /proc/self/smaps_rollup `AnonHugePages`): where the kernel placed the tables. A 200 MB
    table on 4 KB pages pays a TLB miss on most row accesses (10% of the fused SGD step at
    2^20 x 50); clocks need dozens of rounds to see that, this figure does not."""
    try:
        text = Path("/proc/self/smaps_rollup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) / 1024.0
    return None


@dataclass
class Prepared:
    """A cell's input and, unless asked not to, its freshly built trainer; the seconds each took."""

    input: CellInput
    calibration: Any  # model.trainer.Calibration, or None without a discretizer
    device: str | None
    phases: dict[str, float]
    trainer: Any = None


def prepare(cell: Cell, build: bool = True) -> Prepared:
    """The custom op loaded (where the variant needs it), the input opened, the trainer
    built. `build=False`: no trainer (a parameter-server cell builds it in the strategy's
    scope)."""
    from .model.devices import resolve_device
    from .model.trainer import build_trainer, calibrate

    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    device = resolve_device(cell.model.device)
    if cell.model.variant in CUSTOM_OP_VARIANTS:
        if cell.model.device != "cpu":
            raise CellSkipped("custom op has no GPU kernel", "fused_custom_op runs on the CPU only")
        from .custom_ops.build import load

        load()  # built by the parent before any cell started; loading takes milliseconds
        phases["custom_op_load_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
    parse_text = None
    if cell.data.parses_text_with_op:  # the C++ text parser: where it cannot be had, the cell is skipped
        from .custom_ops.ops import text_parser

        parse_text = text_parser()
    inp = open_input(cell, parse_text)
    calibration = None
    if inp.calibration_sample is not None:
        if inp.calibration_sample.batch_size == 0:
            raise ConfigError("discretizer: no example to calibrate its bins on")
        calibration = calibrate(inp.calibration_sample, cell.model.n_bin)
    phases["data_s"] = time.perf_counter() - t0
    prepared = Prepared(inp, calibration, device, phases)
    if build:
        t0 = time.perf_counter()
        prepared.trainer = build_trainer(cell.model, inp.num_features, device, calibration)
        phases["build_s"] = time.perf_counter() - t0
    return prepared


# -- the record's fields, for local and parameter-server cells alike ------------------------
def measured_fields(measurement) -> dict[str, Any]:
    """The throughput, window and step-time fields of one process."""
    throughput = stats.summarize_throughput(measurement.window_samples_per_sec)
    step_ms = stats.percentiles(np.array(measurement.step_seconds) * 1000.0)
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
        **cpu_fields(measurement),
    }


def cpu_fields(measurement) -> dict[str, Any]:
    """CPU time beside wall time: each window's CPU seconds, samples per CPU-second (the
    median over the windows is the process's CPU rate), the cores kept busy, and where the
    CPU time went by thread name (local cells)."""
    samples = [rate * seconds for rate, seconds in zip(measurement.window_samples_per_sec, measurement.window_seconds)]
    windows = [n / cpu if cpu > 0 else float("nan") for n, cpu in zip(samples, measurement.window_cpu_seconds)]
    if not windows:
        return {}
    wall, cpu = sum(measurement.window_seconds), sum(measurement.window_cpu_seconds)
    others, steals = measurement.window_other_cores, measurement.window_steal_cores
    return {"window_cpu_seconds": measurement.window_cpu_seconds, "cpu_windows": windows,
            "cpu_samples_per_sec": process_rate(windows),
            "cpu_busy_cores": cpu / wall if wall > 0 else None,
            "thread_cpu_seconds": measurement.thread_cpu_seconds,
            "other_cores": max(others) if others else None,
            "steal_cores": max(steals) if steals else None}


def model_fields(prepared: Prepared) -> dict[str, Any]:
    """What the cell trained: the table's gradient and update path, variable sizes, the
    data it read and what the discretizer calibrated."""
    trainer, inp = prepared.trainer, prepared.input
    grad_types = sorted(set(trainer.grad_types.values()))
    return {
        "grad_type": grad_types[0] if len(grad_types) == 1 else ",".join(grad_types),
        "update_path": trainer.update_path,
        "num_features": inp.num_features,
        "avg_nnz_per_batch": inp.avg_nnz_per_batch,
        "variables_mb": {v.name: v.shape.num_elements() * 4 / 2**20 for v in trainer.model.train_variables},
        "data_source": inp.facts,
        "calibrated_features": len(prepared.calibration.keys) if prepared.calibration is not None else None,
        "threads_in_effect": threads_in_effect(),
        "peak_rss_mb": peak_rss_mb(),
        "huge_pages_mb": huge_pages_mb(),
        "phases": prepared.phases,
        "nonfinite_inputs": nonfinite_inputs(inp),
        "custom_op_build": _custom_op_build(),
    }


def nonfinite_inputs(inp: CellInput) -> int | None:
    """NaN or infinite values in what the cell trains and evaluates on (its batch pool and
    held-out set); None for a pipeline cell (its parser refuses them as bad lines)."""
    if not inp.pool:
        return None
    return int(sum(np.count_nonzero(~np.isfinite(b.values)) for b in [*inp.pool, inp.held_out]))


def _custom_op_build() -> dict[str, Any] | None:
    """How the loaded fused op library was built (None when the cell loaded none)."""
    from .custom_ops.build import loaded_build

    return loaded_build()


def replay_batches(inp: CellInput, cell: Cell) -> list[tuple[np.ndarray, np.ndarray]]:
    """(rows, keys) of each batch of the cell's own key stream: its batch pool, or a
    pipeline cell's first batch_pool batches read from a fresh pipeline."""
    if inp.pool:
        return [(b.row_ids(), b.keys) for b in inp.pool]
    batches = []
    for sp, _ in inp.dataset().take(cell.measure.batch_pool):
        indices = sp.indices.numpy()
        batches.append((indices[:, 0], indices[:, 1]))
    return batches


def bound_fields(cell: Cell, inp: CellInput, samples_per_sec: float | None = None) -> dict[str, Any]:
    """The cell's memory bound (`measure.bound`) and its share of it, or why there is none."""
    from .custom_ops.build import CustomOpUnavailable, load
    from .measure.bound import KeyStream, bound_seconds, memory_bound

    try:
        library = load(compile_if_missing=False)  # the parent built it before any cell; never compiled in one
        stream = KeyStream.of(replay_batches(inp, cell))
        fields = memory_bound(stream, library=library, num_keys=inp.num_features, cols=cell.model.out_dim,
                              optimizer=cell.model.optimizer, normalize=cell.model.normalization,
                              seconds=bound_seconds(cell.measure))
    except CustomOpUnavailable as exc:
        return {"bound_reason": str(exc)}
    if samples_per_sec:
        fields["bound_share"] = samples_per_sec / fields["bound_samples_per_sec"]
    return fields


LOSS_TAIL_STEPS = 20  # the training loss is the mean over this many last quality steps


def quality_fields(prepared: Prepared, steps: int, losses: list[float]) -> dict[str, Any]:
    """Loss and AUC on the held-out set after `steps` train steps from the initial weights
    (the quality phase), and the training loss of the last of those steps."""
    import tensorflow as tf

    from .model.trainer import loss_fn

    inp = prepared.input
    logits = prepared.trainer.predict_logits(inp.held_out_sp)
    tail = losses[-LOSS_TAIL_STEPS:]
    return {"quality_steps": steps, "loss": float(np.mean(tail)) if tail else None,
            "eval_loss": float(loss_fn(logits, tf.constant(inp.held_out.labels))),
            "auc": stats.auc(inp.held_out.labels, logits.numpy())}


def train_for_quality(cell: Cell, prepared: Prepared) -> dict[str, Any]:
    """The quality phase of a local cell: `quality_steps` steps (all Hogwild workers
    together) from the initial weights, untimed, then the held-out evaluation. Every cell
    of a suite trains the same steps on the same batches before its quality is measured;
    the timing follows (its first steps trace nothing new)."""
    from .measure.hogwild import run_hogwild

    losses: list[float] = []
    t0 = time.perf_counter()
    per_worker = -(-cell.measure.quality_steps // cell.workers)
    run = run_hogwild(prepared.trainer.train_step, prepared.input.batches, cell.workers, steps_per_worker=per_worker,
                      sync=lambda loss: losses.append(float(loss)))
    fields = quality_fields(prepared, run.steps, losses)
    prepared.phases["quality_s"] = time.perf_counter() - t0
    return fields


# -- a local cell ------------------------------------------------------------------------
def run_cell(cell: Cell, *, round: int, isolation: str) -> Record:
    """Train and time one cell; its record (status ok)."""
    from .measure.gpumon import GpuSampler
    from .measure.windows import measure

    prepared = prepare(cell)
    trainer, inp, phases = prepared.trainer, prepared.input, prepared.phases
    phase.announce(f"quality: {cell.measure.quality_steps} steps (the first trace the graph)")
    quality = train_for_quality(cell, prepared)
    phase.wait_turn()  # in an A/B run: prepared; timed only when the other side is parked
    sampler = GpuSampler() if cell.model.device == "gpu" else None
    phase.announce(f"warm-up: {cell.measure.warmup_steps} steps")

    def windows_start() -> None:
        """Between warm-up and the timed windows: start the GPU sampler, zero the input wait."""
        phase.announce(f"timing {cell.measure.windows} windows")
        if sampler is not None:
            sampler.start()
        if inp.stream is not None:
            inp.stream.waited = 0.0

    t0 = time.perf_counter()
    try:
        measurement = measure(trainer.train_step, inp.batches, cell.batch_size, cell.measure, workers=cell.workers,
                              sync=lambda loss: loss.numpy(), on_windows_start=windows_start)
    finally:
        if sampler is not None:
            sampler.stop()
    phases["warmup_s"] = measurement.warmup_seconds
    phases["measure_s"] = time.perf_counter() - t0 - measurement.warmup_seconds
    batches = inp.batches
    rows_touched = [int(trainer.gradient_stats(*batches[i % len(batches)])) for i in range(cell.measure.diagnostic_steps)]
    fields = {**measured_fields(measurement), **quality, **model_fields(prepared),
              "rows_touched": float(np.mean(rows_touched)) if rows_touched else None,
              "rows_touched_per_step": rows_touched}
    if inp.stream is not None:
        fields.update(input_fields(cell, inp, measurement, fields["samples_per_sec"]))
    if sampler is not None:
        fields.update(sampler.summary())
    t0 = time.perf_counter()
    phase.announce("memory bound: replaying the cell's batches")
    fields.update(bound_fields(cell, inp, fields["samples_per_sec"]))  # after the windows: never inside them
    phases["bound_s"] = time.perf_counter() - t0
    return Record.new(cell, round, "ok", isolation=isolation, **fields)


def bound_cell(cell: Cell, *, round: int, isolation: str) -> Record:
    """`sparsebench bound`: the cell's input opened and its memory bound measured, no model
    trained."""
    prepared = prepare(cell, build=False)
    inp = prepared.input
    t0 = time.perf_counter()
    fields = bound_fields(cell, inp)
    prepared.phases["bound_s"] = time.perf_counter() - t0
    if fields.get("bound_reason"):
        raise CellSkipped(fields["bound_reason"])
    return Record.new(cell, round, "ok", isolation=isolation, num_features=inp.num_features,
                      avg_nnz_per_batch=inp.avg_nnz_per_batch, data_source=inp.facts, phases=prepared.phases,
                      nonfinite_inputs=nonfinite_inputs(inp), custom_op_build=_custom_op_build(),
                      threads_in_effect=threads_in_effect(), peak_rss_mb=peak_rss_mb(), **fields)


def input_fields(cell: Cell, inp: CellInput, measurement, trained: float) -> dict[str, Any]:
    """A pipeline cell: the pipeline timed alone, the share of the windows training waited
    for it, and the verdict."""
    from .inputs.pipeline import input_alone

    wait_share = inp.stream.waited / max(sum(measurement.window_seconds), 1e-9)
    _, seconds = cell.measure.window_limits()
    rates, cpu_per_example = input_alone(inp.dataset(), cell.batch_size, seconds or 1.0, cell.measure.windows)
    alone = stats.summarize_throughput(rates)["median"]
    cores = threads_in_effect()["intra_op_threads_resolved"]
    cpu_share = cpu_per_example * trained / cores if trained else None
    return {"input_samples_per_sec": alone, "input_windows": rates, "input_wait_share": wait_share,
            "input_cpu_us_per_example": cpu_per_example * 1e6, "input_cpu_share": cpu_share,
            "input_bound": input_bound_verdict(wait_share, alone, trained, cpu_share)}


def count_cell(cell: Cell, *, round: int, isolation: str, steps: int, folder: Path, index: int) -> Record:
    """Warm up (uncounted), then count `steps` steps under callgrind: instructions and
    estimated cycles per example, and the costliest functions (`measure.counting`)."""
    import os

    from .measure.counting import (CountingUnavailable, Shim, count_steps, dumps_of, median_step, parse_callgrind,
                                  per_example, step_series)
    from .measure.hogwild import run_hogwild

    if cell.workers != 1:
        raise CellSkipped("not counted with Hogwild workers", "counting needs one thread: Hogwild cells are timed only")
    shim = Shim()
    if not shim.under_valgrind:
        raise CountingUnavailable("the worker is not running under valgrind")
    prepared = prepare(cell)
    trainer, batches = prepared.trainer, prepared.input.batches
    sync = lambda loss: loss.numpy()  # noqa: E731
    run_hogwild(trainer.train_step, batches, 1, steps_per_worker=max(1, cell.measure.warmup_steps), sync=sync)
    count_steps(shim, trainer.train_step, batches, steps, label=f"cell {index}: {cell.cell_id}",
                offset=cell.measure.warmup_steps, sync=sync)
    dumps = dumps_of(folder, os.getpid())[-steps:]
    if len(dumps) < steps:
        raise CountingUnavailable(f"callgrind wrote {len(dumps)} dumps into {folder}, expected {steps}")
    profiles = [parse_callgrind(dump) for dump in dumps]
    for dump in dumps:
        dump.unlink()  # large; the record keeps what is compared
    median, _ = median_step(profiles)
    fields = model_fields(prepared)
    return Record.new(cell, round, "ok", isolation=isolation, counted_steps=steps, **step_series(profiles),
                      **per_example(median, cell.batch_size),
                      **{k: fields[k] for k in ("peak_rss_mb", "grad_type", "update_path", "phases", "variables_mb",
                                                "num_features", "avg_nnz_per_batch", "data_source",
                                                "threads_in_effect")})


def profile_cell(cell: Cell, *, round: int, isolation: str, steps: int, logdir: Path) -> Record:
    """Warm up, then run `steps` steps under TensorFlow's profiler; write the op tables."""
    import tensorflow as tf

    from .measure import profiler
    from .measure.hogwild import run_hogwild

    prepared = prepare(cell)
    trainer, batches = prepared.trainer, prepared.input.batches
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
    summary = profiler.write_outputs(logdir, cell.cell_id, run.steps, 1000.0 * elapsed / run.steps * cell.workers,
                                     note=profiler.GPU_HOST_TIME_NOTE if cell.model.device == "gpu" else None)
    extra = {}
    if cell.model.device == "gpu":
        extra["gpu_peak_mb"] = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
    return profile_record(cell, round, isolation, logdir, summary, prepared, **extra)


def profile_record(cell: Cell, round: int, isolation: str, logdir: Path, summary: dict[str, Any], prepared: Prepared,
                   **extra: Any) -> Record:
    """A profiled cell's record: where its profile is, the op summary, and how it ran."""
    fields = model_fields(prepared)
    return Record.new(cell, round, "ok", isolation=isolation, profile_dir=str(logdir), profile=summary,
                      **{k: fields[k] for k in ("peak_rss_mb", "grad_type", "update_path", "phases", "variables_mb",
                                                "num_features", "data_source")}, **extra)
