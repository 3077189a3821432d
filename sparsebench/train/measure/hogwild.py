"""Hogwild: N Python threads running the same train step on shared variables, no lock.

Concurrent calls of one `tf.function` run in parallel because TensorFlow releases the
GIL while ops execute. "No lock" is true of our code; TensorFlow's kernels still take the
variable's mutex, but for float tables in shared mode: `ResourceGather`,
`ResourceScatterSub/Max/Update` and the `ResourceApply*` / `ResourceSparseApply*` updates
(with `use_locking=False`, as here) take a shared lock, so two threads updating the same
table do run at the same time and their row updates may interleave (Niu et al., 2011:
with sparse gradients two threads rarely touch the same rows); `examples/hogwild_locks.py`
measures it. With one worker no thread is started, so the single-threaded baseline pays
no threading overhead.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence


@dataclass
class HogwildRun:
    """What the workers did: steps completed, each step's duration, each worker's last result."""

    steps: int = 0
    step_seconds: list[float] = field(default_factory=list)
    last_results: list = field(default_factory=list)


def run_hogwild(
    step: Callable,
    batches: Sequence,
    workers: int,
    steps_per_worker: int | None = None,
    seconds: float | None = None,
    offset: int = 0,
    sync: Callable = lambda result: result,
    clock: Callable[[], float] = time.perf_counter,
) -> HogwildRun:
    """Each of `workers` threads calls `step(*batch)` until it has done `steps_per_worker`
    steps or `seconds` have passed since it started (whichever comes first; at least one
    must be given). `sync(result)` runs after each step so the step's time includes its
    execution (e.g. `.numpy()` on the loss).

    Worker w takes batches `offset + w, offset + w + workers, ...`, cycling through
    `batches`, so threads never share a batch in one round. The first exception raised in
    any worker is re-raised here after all workers stopped.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if steps_per_worker is None and seconds is None:
        raise ValueError("give steps_per_worker or seconds")
    run = HogwildRun(last_results=[None] * workers)
    per_worker_times: list[list[float]] = [[] for _ in range(workers)]
    errors: list[BaseException] = []

    def work(w: int) -> None:
        times = per_worker_times[w]
        start = clock()
        i = 0
        try:
            while (steps_per_worker is None or i < steps_per_worker) and (
                seconds is None or clock() - start < seconds
            ):
                t0 = clock()
                result = sync(step(*batches[(offset + w + i * workers) % len(batches)]))
                times.append(clock() - t0)
                run.last_results[w] = result
                i += 1
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            errors.append(exc)

    if workers == 1:
        work(0)
    else:
        threads = [threading.Thread(target=work, args=(w,), name=f"hogwild-{w}") for w in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    for times in per_worker_times:
        run.step_seconds.extend(times)
    run.steps = len(run.step_seconds)
    return run
