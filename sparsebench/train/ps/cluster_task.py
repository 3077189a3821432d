"""One task of a parameter-server cluster: `python -m sparsebench.train.ps.cluster_task`.

It runs TensorFlow's own server (`tf.distribute.Server`) for a `ps` or `worker` task and
serves until killed; the coordinator (a cell's worker) places variables on the PS tasks
and schedules train steps on the workers. The cluster comes from `--cluster` (JSON text
or a file: either a TF_CONFIG-style `{"cluster": {...}}` or the bare `{job: [addresses]}`)
and `--task job:index`, or from the `TF_CONFIG` environment variable when neither is
given. `sparsebench serve` runs this module for the tasks of a real cluster.
"""

from __future__ import annotations

import argparse
import sys

from ...errors import ConfigError
from ...plan.cluster_file import check_ports_free, from_tf_config, parse_task, read_cluster


# A task told to load the fused op library (`--custom-op PATH`) that cannot exits with this
# code, its reason on the last line of its log: the cell is skipped, naming the task.
CUSTOM_OP_EXIT = 3


def load_custom_op(how: str, task: str) -> bool:
    """Load the fused op library before the server starts (TensorFlow registers ops per
    process: the worker builds graphs holding them, the PS tasks run them). `how`: "off";
    "try" (build or load it where this machine can, else serve the stock layouts only,
    saying why); or a library's path, which must load (exit CUSTOM_OP_EXIT if not)."""
    if how == "off":
        return False
    import tensorflow as tf

    if how == "try":
        from ..custom_ops.build import build

        info = build()
        if not info.ok:
            print(f"{task}: the fused layer is not served here (stock layouts only): {info.reason}", flush=True)
            return False
        how = info.library
    try:
        tf.load_op_library(how)
    except (OSError, tf.errors.OpError) as exc:
        message = getattr(exc, "message", None) or str(exc)
        print(f"sparsebench: error: {task} cannot load the fused op library {how}: {message.strip().splitlines()[0]}",
              file=sys.stderr, flush=True)  # a local cluster's task log holds stderr too: its last line is this
        sys.exit(CUSTOM_OP_EXIT)
    print(f"{task}: fused op library loaded from {how}", flush=True)
    return True


def serve(cluster: dict[str, list[str]], job: str, index: int, intra_op_threads: int = 0,
          inter_op_threads: int = 0, profiler_port: int = 0, custom_op: str = "off") -> None:
    """Start the task's server (and, with a port, TensorFlow's profiler server, so
    `sparsebench profile` can trace this task) and serve until the process is killed."""
    import tensorflow as tf

    load_custom_op(custom_op, f"{job}:{index}")

    if intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
    if inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
    server = tf.distribute.Server(tf.train.ClusterSpec(cluster), job_name=job, task_index=index, protocol="grpc",
                                  start=True)
    if profiler_port:
        tf.profiler.experimental.server.start(profiler_port)
    print(f"serving {job}:{index} at {cluster[job][index]}", flush=True)
    server.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsebench.train.ps.cluster_task")
    parser.add_argument("--cluster", help="JSON text or file: {job: [host:port]} or TF_CONFIG-style")
    parser.add_argument("--task", help="ps:N or worker:N")
    parser.add_argument("--intra-op-threads", type=int, default=0)
    parser.add_argument("--inter-op-threads", type=int, default=0)
    parser.add_argument("--profiler-port", type=int, default=0, help="also serve TensorFlow's profiler here")
    parser.add_argument("--custom-op", default="off", metavar="off|try|PATH",
                        help="load the fused op library before serving: off, try (build it if this machine can), "
                             "or the library's path (must load)")
    args = parser.parse_args(argv)
    try:
        if args.cluster is None and args.task is None:
            cluster, task = from_tf_config()
        elif args.cluster is None or args.task is None:
            raise ConfigError("give both --cluster and --task (or neither, with TF_CONFIG)")
        else:
            cluster, task = read_cluster(args.cluster), args.task
        job, index = parse_task(task, cluster)
        check_ports_free(cluster, job, index, args.profiler_port)
    except ConfigError as exc:
        print(f"sparsebench: error: {exc}", file=sys.stderr)
        return 2
    from ..tf_import import import_tensorflow

    import_tensorflow()
    serve(cluster, job, index, args.intra_op_threads, args.inter_op_threads, args.profiler_port, args.custom_op)
    return 0


if __name__ == "__main__":
    sys.exit(main())
