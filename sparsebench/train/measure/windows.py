"""The measurement loop: warm-up excluded, several timed windows, every window kept.

Why windows: one long timing hides noise; several windows show it (their spread becomes
the interval and the CV), and the median of windows resists a single hiccup. The clock
is injectable so tests can check the arithmetic without timing anything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ...plan.spec import MeasureSpec
from .cputime import (interference, machine_cpu_seconds, process_cpu_seconds, thread_cpu_difference,
                      thread_cpu_seconds)
from .hogwild import run_hogwild


class EmptyWindow(RuntimeError):
    """A timed window in which no step finished: its rate would be 0 samples/s, which is
    not a measurement of the step (the cell fails instead of recording it)."""


@dataclass
class Measurement:
    window_samples_per_sec: list[float] = field(default_factory=list)
    window_seconds: list[float] = field(default_factory=list)
    window_cpu_seconds: list[float] = field(default_factory=list)  # the process's CPU seconds (all threads)
    window_other_cores: list[float] = field(default_factory=list)  # cores other processes used meanwhile
    window_steal_cores: list[float] = field(default_factory=list)  # cores the hypervisor gave other guests
    thread_cpu_seconds: dict[str, float] | None = None  # per thread name, over all the timed windows
    window_steps: list[int] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    warmup_seconds: float = 0.0
    last_results: list = field(default_factory=list)


def measure(
    step: Callable,
    batches: Sequence,
    batch_size: int,
    settings: MeasureSpec,
    workers: int = 1,
    sync: Callable = lambda result: result,
    clock: Callable[[], float] = time.perf_counter,
    on_windows_start: Callable[[], None] = lambda: None,
    cpu_clock: Callable[[], float] = process_cpu_seconds,
) -> Measurement:
    """Warm up (first calls trace the graph), then time `settings.windows` windows.
    `on_windows_start` runs between the two (e.g. to start a GPU sampler after warm-up).

    A window's throughput is (steps done by all workers x batch size) / wall seconds.
    Warm-up steps run with the same number of workers so every thread's first call
    (and any lazy initialization) happens before timing starts.
    """
    result = Measurement()
    offset = 0
    if settings.warmup_steps > 0:
        start = clock()
        warm = run_hogwild(step, batches, workers, steps_per_worker=max(1, settings.warmup_steps // workers),
                           sync=sync, clock=clock)
        result.warmup_seconds = clock() - start
        offset += warm.steps
    steps_per_window, seconds_per_window = settings.window_limits()
    on_windows_start()
    threads_before = thread_cpu_seconds()
    for _ in range(settings.windows):
        start, cpu_start, machine_start = clock(), cpu_clock(), machine_cpu_seconds()
        run = run_hogwild(step, batches, workers, steps_per_worker=steps_per_window,
                          seconds=seconds_per_window, offset=offset, sync=sync, clock=clock)
        elapsed, cpu = clock() - start, cpu_clock() - cpu_start
        other, steal = interference(machine_start, machine_cpu_seconds(), cpu, elapsed)
        if other is not None:
            result.window_other_cores.append(other)
            result.window_steal_cores.append(steal)
        if run.steps == 0:
            raise EmptyWindow(f"timed window {len(result.window_steps) + 1} ran no step in {elapsed:.3g} s: the step "
                              f"takes longer than the window (raise seconds_per_window)")
        offset += run.steps
        result.window_seconds.append(elapsed)
        result.window_cpu_seconds.append(cpu)
        result.window_steps.append(run.steps)
        result.window_samples_per_sec.append(run.steps * batch_size / elapsed if elapsed > 0 else float("nan"))
        result.step_seconds.extend(run.step_seconds)
        result.last_results = run.last_results
    result.thread_cpu_seconds = thread_cpu_difference(threads_before, thread_cpu_seconds())
    return result
