"""Hogwild: N Python threads running the same train step on shared variables, no lock.

Concurrent calls of one `tf.function` run in parallel because TensorFlow releases the
GIL while ops execute (DESIGN.md section 3). Updates race by design (Niu et al., 2011);
with sparse gradients two threads rarely touch the same rows.
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence


def run_hogwild(step: Callable, batches: Sequence, workers: int, steps_per_worker: int, offset: int = 0) -> list:
    """Run `steps_per_worker` calls of `step(*batch)` in each of `workers` threads.

    Worker w takes batches `offset + w, offset + w + workers, ...` (cycling through
    `batches`), so threads never share a batch in one round. Returns each worker's last
    result; the first exception raised in any worker is re-raised here.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    results: list = [None] * workers
    errors: list[BaseException] = []

    def work(w: int) -> None:
        try:
            for i in range(steps_per_worker):
                results[w] = step(*batches[(offset + w + i * workers) % len(batches)])
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
    return results
