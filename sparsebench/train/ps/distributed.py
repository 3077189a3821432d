"""A cell on TensorFlow's ParameterServerStrategy, this process as the coordinator.

How the model is laid out: built under the strategy's scope with no variable
partitioner, so TensorFlow places variables round-robin over the PS tasks in creation
order. The sparse table's shards are created first, so `row_partitioned` and
`col_partitioned` with `shards = ps_tasks` put one shard on each PS task (row shards:
each PS serves the rows of its ids; column shards: every PS serves a slice of every
row); an unpartitioned table sits whole on `ps:0`. Optimizer slots are colocated with
their variable. The record lists where every variable went (`placement`).

Training is asynchronous, as the talk's Hogwild-on-PS setup: every worker task runs its
own steps and applies its own updates to the shared variables. The coordinator schedules
functions of `steps_per_execution` steps each (so one round trip serves that many steps),
each worker reading batches from its own copy of the cell's batch pool.

Throughput: a window schedules enough functions to last about the window's seconds (the
rate is estimated after warm-up) and ends when all of them are done (`join`): its
samples/s is every worker's samples over that wall time. Each worker task also counts its
own steps (a per-worker variable), which gives each worker's samples/s over the windows.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np

from ...plan.cell import Cell
from ..measure.cputime import process_tree_cpu_seconds
from ..measure.windows import Measurement

# The pool travels to each worker as constants inside its dataset function, so its size
# is bounded by what one serialized function may hold (protobuf's 2 GB, with copies made
# on the way). Batches travel as the COO indices the step consumes (int64 [nnz, 2]): a
# compact form rebuilt on the worker (int32 keys and per-row counts, 8 bytes per entry
# instead of 20) cost the fused PS cell 6% of its CPU time per sample (`ab`, 4 rounds,
# 95% CI 2-11%).
POOL_BYTES_CAP = 256 * 2**20


def shipped_bytes(batch, num_features: int) -> int:
    """Bytes one batch takes in a worker's dataset function."""
    return batch.nnz * (16 + 4) + batch.batch_size * 4 + 8


def batches_to_ship(pool, num_features: int, cap_bytes: int = POOL_BYTES_CAP) -> int:
    """How many of the pool's batches (at least one) fit in `cap_bytes` once shipped.

    Every local cell trains on its whole pool; a PS worker trained on fewer batches
    memorises them and its AUC falls (0.56 with 8 of 32 batches against 0.63 local, for
    fused Lazy Adam at batch 1024), so the cap is in bytes, as high as is safe."""
    used, total = 0, 0
    for batch in pool:
        total += shipped_bytes(batch, num_features)
        if total > cap_bytes and used:
            break
        used += 1
    return used


def connect(cluster: dict[str, list[str]]):
    """(strategy, coordinator) for `cluster`, this process being its `chief`."""
    import tensorflow as tf

    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(cluster), task_type="chief", task_id=0, rpc_layer="grpc")
    strategy = tf.distribute.experimental.ParameterServerStrategy(resolver)
    coordinator = tf.distribute.experimental.coordinator.ClusterCoordinator(strategy)
    return strategy, coordinator


def _dataset_fn(pool, num_features: int):
    """A dataset function for `create_per_worker_dataset`: the pool's batches, cycled, as
    the same SparseTensors the local cell feeds (row-major COO, int64 indices)."""
    import tensorflow as tf

    starts = np.concatenate([[0], np.cumsum([b.nnz for b in pool])]).astype(np.int64)
    indices = np.concatenate([b.coo_indices() for b in pool]).astype(np.int64)
    values = np.concatenate([b.values for b in pool]).astype(np.float32)
    labels = np.stack([b.labels for b in pool]).astype(np.float32)
    batch_size = pool[0].batch_size

    def dataset_fn():
        all_indices, all_values = tf.constant(indices), tf.constant(values)
        all_starts, all_labels = tf.constant(starts), tf.constant(labels)

        def batch(i):
            begin, end = all_starts[i], all_starts[i + 1]
            sp = tf.SparseTensor(all_indices[begin:end], all_values[begin:end],
                                 tf.constant([batch_size, num_features], tf.int64))
            return sp, all_labels[i]

        return tf.data.Dataset.range(len(pool)).repeat().map(batch).prefetch(2)

    return dataset_fn


class PsTraining:
    """The strategy, the trainer built in its scope, and the scheduled multi-step function."""

    def __init__(self, cell: Cell, cluster: dict[str, list[str]], pool, num_features: int, build: Callable):
        import tensorflow as tf

        self.cell = cell
        self.steps_per_execution = cell.distribution.steps_per_execution
        self.strategy, self.coordinator = connect(cluster)
        with self.strategy.scope():
            self.trainer = build()
            # Each worker task's own count of the steps it ran (TensorFlow's experimental
            # per-worker variables): per-worker throughput, where the coordinator only
            # knows how many functions finished in total.
            self.steps_done = tf.Variable(tf.constant(0, tf.int64), per_worker_variable=True)
        trainer, strategy, steps_done = self.trainer, self.strategy, self.steps_done
        self.batch_pool_used = batches_to_ship(pool, num_features)
        self.dataset = self.coordinator.create_per_worker_dataset(
            _dataset_fn(pool[:self.batch_pool_used], num_features))
        self.iterator = iter(self.dataset)
        k = self.steps_per_execution

        @tf.function
        def run_steps(iterator):
            loss = tf.constant(0.0)
            for _ in tf.range(k):
                sp, labels = next(iterator)
                loss = strategy.run(trainer._train_step, args=(sp, labels))
            # Tied to the result: per-worker variables get no automatic control dependencies.
            with tf.control_dependencies([steps_done.assign_add(k)]):
                return tf.identity(loss)

        self.run_steps = run_steps

    def placement(self) -> list[dict[str, Any]]:
        model = self.trainer.model
        maxima = getattr(model, "maxima", None) or ([model.norm.max_x] if model.norm is not None else [])
        variables = list(model.train_variables) + list(maxima)
        variables += self.trainer.optimizer.slot_variables() + [self.trainer.optimizer.iterations]
        return [{"variable": v.name, "shape": v.shape.as_list(), "device": v.device} for v in variables]

    def worker_steps(self) -> list[int | None]:
        """Steps each worker task has run so far, in task order (None for a lost task).

        Read one worker at a time, as `PerWorkerVariable.read_all()` does inside, so that a
        dead worker costs only its own count."""
        import tensorflow as tf

        steps: list[int | None] = []
        for value in self.steps_done._per_worker_vars._values:  # noqa: SLF001 - read_all() fails as a whole
            try:
                steps.append(int(value.get()))
            except (tf.errors.OpError, tf.errors.CancelledError):
                steps.append(None)
        return steps

    def schedule(self, functions: int) -> list:
        return [self.coordinator.schedule(self.run_steps, args=(self.iterator,)) for _ in range(functions)]

    def train_steps(self, steps: int) -> tuple[int, list[float]]:
        """At least `steps` train steps over the workers (whole functions of
        `steps_per_execution`), waited for; (steps run, each function's last loss)."""
        functions = max(1, math.ceil(steps / self.steps_per_execution))
        remote = self.schedule(functions)
        self.coordinator.join()
        return functions * self.steps_per_execution, [float(r.fetch()) for r in remote]

    def measure(self, batch_size: int, clock: Callable[[], float] = time.perf_counter,
                on_windows_start: Callable[[], None] = lambda: None,
                cpu_clock: Callable[[], float] = process_tree_cpu_seconds) -> Measurement:
        """Warm up (every worker traces), estimate a function's rate, then time the windows
        (`on_windows_start` runs just before the first)."""
        settings = self.cell.measure
        workers = self.cell.distribution.worker_tasks
        result = Measurement()
        start = clock()
        warm = max(workers, math.ceil(settings.warmup_steps / self.steps_per_execution))
        self.schedule(warm)
        self.coordinator.join()
        result.warmup_seconds = clock() - start
        start = clock()
        self.schedule(2 * workers)
        self.coordinator.join()
        functions_per_second = 2 * workers / max(clock() - start, 1e-9)
        steps_limit, seconds_limit = settings.window_limits()
        per_window = []
        if steps_limit is not None:
            per_window.append(math.ceil(steps_limit / self.steps_per_execution))
        if seconds_limit is not None:
            per_window.append(math.ceil(seconds_limit * functions_per_second))
        functions = max(1, min(per_window))
        on_windows_start()
        steps_before = self.worker_steps()
        for _ in range(settings.windows):
            start, cpu_start = clock(), cpu_clock()
            self.schedule(functions)
            self.coordinator.join()
            elapsed, cpu = clock() - start, cpu_clock() - cpu_start
            result.window_cpu_seconds.append(cpu)
            steps = functions * self.steps_per_execution
            result.window_seconds.append(elapsed)
            result.window_steps.append(steps)
            result.window_samples_per_sec.append(steps * batch_size / elapsed if elapsed > 0 else float("nan"))
            result.step_seconds.extend([elapsed / steps * workers] * steps)
        seconds = sum(result.window_seconds)
        self.per_worker_samples_per_sec = {
            f"worker:{i}": (after - before) * batch_size / seconds
            if seconds > 0 and before is not None and after is not None else None
            for i, (before, after) in enumerate(zip(steps_before, self.worker_steps()))}
        return result


def cluster_record(cell: Cell, cluster: dict[str, list[str]], source: str, private_network: bool,
                   training: PsTraining, lost: dict[str, str]) -> dict[str, Any]:
    d = cell.distribution
    return {
        "strategy": d.strategy,
        "ps_tasks": len(cluster["ps"]),
        "worker_tasks": len(cluster["worker"]),
        "steps_per_execution": d.steps_per_execution,
        "source": source,
        "hosts": {f"{job}:{i}": address for job, addresses in cluster.items() for i, address in enumerate(addresses)},
        "private_network": private_network,
        "placement": training.placement(),
        "batch_pool_used": training.batch_pool_used,
        "worker_tasks_lost": lost,
        "recovered": bool(lost),
    }
