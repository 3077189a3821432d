"""Which of TensorFlow's variable ops actually run in parallel from two Python threads?

Hogwild in sparsebench means N Python threads calling one traced train step on shared
variables, with no lock of ours. TensorFlow's kernels still lock the variable they touch
(a shared or an exclusive lock on the variable's mutex), so "no lock" is only true of the
Python side. This script measures it: each op is called N times from one thread, then N
times from each of two threads on the same variable, then on two different variables,
with one intra-op thread per op so that two threads can at most double the rate.

    python examples/hogwild_locks.py [--rows 1048576] [--calls 200]

A speedup near 2.0x on the same variable: the two calls ran in parallel. Near 1.0x:
they were serialized (an exclusive lock, or a shared resource such as memory bandwidth;
the "different variables" column tells which).
"""

from __future__ import annotations

import argparse
import os
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402


def rate(fn, threads: int, calls: int) -> float:
    """Calls per second of `fn(i)` with `threads` threads each making `calls` calls."""
    def work(i):
        for _ in range(calls):
            fn(i).numpy()  # wait for the op to finish

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return threads * calls / (time.perf_counter() - start)


def _done(op) -> tf.Tensor:
    with tf.control_dependencies([op]):
        return tf.constant(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=2**20)
    parser.add_argument("--cols", type=int, default=50)
    parser.add_argument("--ids", type=int, default=100_000, help="rows touched per call (~a batch of 1024)")
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    tables = [tf.Variable(tf.zeros([args.rows, args.cols])) for _ in range(2)]
    ids = tf.random.uniform([args.ids], 0, args.rows, dtype=tf.int64, seed=1)
    updates = tf.random.normal([args.ids, args.cols], seed=2)
    unique_ids = tf.unique(ids).y
    unique_updates = tf.random.normal([tf.shape(unique_ids)[0], args.cols], seed=3)
    accums = [tf.Variable(tf.fill([args.rows, args.cols], 0.1)) for _ in tables]
    dense_update = tf.random.normal([args.rows, args.cols], seed=4)

    # Each returns a scalar: returning the variable would read (and, after a sparse
    # update, copy) the whole table every call.
    ops = {
        "ResourceGather": lambda v, a: tf.reduce_sum(tf.gather(v, ids)),
        "ResourceScatterSub": lambda v, a: _done(tf.raw_ops.ResourceScatterSub(resource=v.handle, indices=ids,
                                                                            updates=updates)),
        "ResourceScatterMax": lambda v, a: _done(tf.raw_ops.ResourceScatterMax(resource=v.handle, indices=ids,
                                                                            updates=updates)),
        "ResourceScatterUpdate": lambda v, a: _done(tf.raw_ops.ResourceScatterUpdate(resource=v.handle, indices=ids,
                                                                                  updates=updates)),
        "ResourceSparseApplyAdagradV2": lambda v, a: _done(tf.raw_ops.ResourceSparseApplyAdagradV2(
            var=v.handle, accum=a.handle, lr=0.01, epsilon=1e-7, grad=unique_updates,
            indices=unique_ids)),
        "ResourceApplyGradientDescent": lambda v, a: _done(tf.raw_ops.ResourceApplyGradientDescent(
            var=v.handle, alpha=0.01, delta=dense_update)),
    }
    print(f"{'op':<28} {'1 thread':>10} {'2 threads, same var':>20} {'2 threads, 2 vars':>18}  (calls/s)")
    for name, op in ops.items():
        traced = [tf.function(lambda v=v, a=a: op(v, a)) for v, a in zip(tables, accums)]
        for t in traced:
            t()  # trace before timing
        one = rate(lambda i: traced[0](), 1, args.calls)
        same = rate(lambda i: traced[0](), 2, args.calls)
        apart = rate(lambda i: traced[i](), 2, args.calls)
        print(f"{name:<28} {one:>10.0f} {same:>12.0f} ({same / one:.2f}x) {apart:>10.0f} ({apart / one:.2f}x)")


if __name__ == "__main__":
    main()
