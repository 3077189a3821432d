"""The worker process: `python -m sparsebench.train.worker --jobs JOB --out DIR`.

It is the only kind of process that imports TensorFlow. The orchestrator starts it with
the cells' environment (OMP/MKL/oneDNN variables are read when TensorFlow loads) and a
`plan.job.Job`; the worker sets TensorFlow's inter/intra-op threads before the runtime
initializes, then runs the job's cells one after another (`cell.run_cell`, or
`ps.cell.run_ps_cell` for a parameter-server cell; the `profile_*` forms for `sparsebench
profile`). This module is only that loop.

Results travel through files, not stdout, so library log noise cannot corrupt them: before
a cell starts the worker writes `DIR/<i>.started`; when it ends, `DIR/<i>.json`, one
`Record` (written to a temporary name and renamed, so a reader never sees half a record).
A cell that raises is recorded as `failed` with its error (`skipped` for a missing GPU) and
the worker moves on to the next cell; a crash of the process itself is noticed by the
orchestrator.

`python -m sparsebench.train.worker --probe` prints TensorFlow's facts as one JSON line;
`--protocol` the worker protocol this version speaks (`sparsebench.WORKER_PROTOCOL`), then a
`features:` line (`WORKER_FEATURES`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from .. import WORKER_PROTOCOL

# What this worker does beyond protocol 1, for a side server that drives it:
# `ready`: it writes {out}/ready once TensorFlow is imported, before its first cell;
# `turns`: in lockstep, a local cell writes {out}/<i>.prepared after its preparation and
# waits for {out}/<i>.time before it is timed (measure.phase.wait_turn).
WORKER_FEATURES = ("ready", "turns")
from ..errors import CellSkipped, UserError
from ..plan.cell import Cell, Threads
from ..plan.job import Job
from ..record import Record
from .inputs.datafiles import DataFileError
from .measure.tf_facts import tensorflow_info, threads_in_effect
from .measure.windows import EmptyWindow
from .measure import phase
from .tf_import import import_tensorflow

# A cell that fails for one of these failed on its settings or its data: the record's reason
# is the message alone (one line the user can act on), the traceback is kept beside it.
USER_ERRORS = (UserError, DataFileError, EmptyWindow)

_PROCESS_START = time.perf_counter()


def configure_threads(threads: Threads) -> dict[str, Any]:
    """Set TF's thread pools (before any op runs) and return the values in effect."""
    import tensorflow as tf

    if threads.intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads.intra_op_threads)
    if threads.inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(threads.inter_op_threads)
    return threads_in_effect()


def _write_atomic(path: Path, record: Record) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        json.dump(record.to_dict(), fh, allow_nan=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def run_cell_of(job: Job, cell: Cell, index: int, out_dir: Path, fail_now) -> Record:
    """Run one of the job's cells the way the job asks: timed or profiled, local or on PS."""
    from .cell import bound_cell, count_cell, profile_cell, run_cell

    how = {"round": job.round, "isolation": job.isolation}
    if job.bound is not None:
        if not cell.distribution.is_local:
            from .ps.cell import PS_BOUND_REASON

            raise CellSkipped("no memory bound on parameter servers", PS_BOUND_REASON)
        return bound_cell(cell, **how)
    if job.count is not None:
        if not cell.distribution.is_local:
            raise CellSkipped("not counted on parameter servers",
                              "parameter-server cells are not counted: their work is spread over processes")
        return count_cell(cell, **how, steps=job.count.steps, folder=Path(job.count.folder), index=index)
    logdir = Path(job.profile.folder) / cell.cell_id if job.profile is not None else None
    if not cell.distribution.is_local:
        from .ps.cell import profile_ps_cell, run_ps_cell

        cluster = {"remote": job.cluster, "private_network": job.private_network,
                   "cluster_dir": out_dir / f"cluster-{index}", "fail_now": fail_now}
        if job.profile is not None:
            return profile_ps_cell(cell, **how, steps=job.profile.steps, logdir=logdir, **cluster)
        return run_ps_cell(cell, **how, **cluster)
    if job.profile is not None:
        return profile_cell(cell, **how, steps=job.profile.steps, logdir=logdir)
    return run_cell(cell, **how)


def run_jobs(jobs_path: Path, out_dir: Path) -> int:
    from ..lifetime import die_with_parent
    from .ps.cluster import bring_loopback_up

    die_with_parent()  # a kill -9 of the orchestrator takes this worker (and its cluster) with it
    job = Job.read(jobs_path)
    if job.private_network:
        bring_loopback_up()
    if not job.cells:
        return 0
    startup: dict[str, Any] = {}
    t0 = time.perf_counter()
    import_tensorflow()  # here, after the environment is in place

    effect = configure_threads(job.cells[0].threads)
    startup["process_start_to_tf_s"] = time.perf_counter() - _PROCESS_START
    startup["tf_import_s"] = time.perf_counter() - t0
    tf_facts = tensorflow_info()
    print(f"worker {os.getpid()}: TensorFlow {tf_facts.get('version')} imported in {startup['tf_import_s']:.1f} s; "
          f"intra-op threads {effect.get('intra_op_threads_resolved')}, inter-op {effect.get('inter_op_threads_resolved')}; "
          f"{len(job.cells)} cell(s)", flush=True)  # the first line of its log (what `run -v` streams on any machine)
    (out_dir / "ready").write_text(str(time.time()))  # started: the parent may now time the other side's cells
    phase.configure(out_dir)
    for index, cell in enumerate(job.cells):
        while job.lockstep and not (out_dir / f"{index}.go").exists():
            time.sleep(0.002)
        (out_dir / f"{index}.started").write_text(str(time.time()))
        phase.begin_cell(out_dir, index, job.lockstep)
        phase.announce("preparing data and model")
        started = time.perf_counter()

        def fail_now(message: str, index: int = index, cell: Cell = cell, started: float = started) -> None:
            """From the cluster watchdog: record the cell failed and end the process (the
            coordinator may be waiting on a task that will never answer)."""
            _write_atomic(out_dir / f"{index}.json", Record.new(
                cell, job.round, "failed", message[:500], tensorflow=tf_facts,
                worker={"pid": os.getpid(), "cell_seconds": time.perf_counter() - started}))
            os._exit(3)

        try:
            record = run_cell_of(job, cell, index, out_dir, fail_now)
        except CellSkipped as exc:
            record = Record.new(cell, job.round, "skipped", exc.reason, error=str(exc))
        except USER_ERRORS as exc:  # the cell's settings or data: its message is the reason, no type path
            record = Record.new(cell, job.round, "failed", str(exc).splitlines()[0][:500] if str(exc) else
                                type(exc).__name__, traceback=traceback.format_exc())
        except Exception as exc:  # noqa: BLE001 - a failed cell is data, not a crash
            lines = [line for line in traceback.format_exception_only(type(exc), exc) if line.strip()]
            record = Record.new(cell, job.round, "failed", lines[-1].strip()[:500], traceback=traceback.format_exc())
        record = record.replace(tensorflow=tf_facts, worker={
            "pid": os.getpid(),
            "cell_seconds": time.perf_counter() - started,
            "cells_before_in_process": index,
            "threads_requested": effect,
            **startup,
        })
        _write_atomic(out_dir / f"{index}.json", record)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsebench.train.worker")
    parser.add_argument("--jobs", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--probe", action="store_true", help="print TensorFlow's facts as JSON")
    parser.add_argument("--build-op", action="store_true",
                        help="build (or load from the cache) the fused op; print its build as JSON, with TensorFlow's "
                             "facts under \"tensorflow\" (one TensorFlow start for both)")
    parser.add_argument("--protocol", action="store_true", help="print the worker protocol this version speaks")
    args = parser.parse_args(argv)
    if args.protocol:
        print(WORKER_PROTOCOL)
        print("features: " + " ".join(WORKER_FEATURES))
        return 0
    if args.probe or args.build_op:
        import_tensorflow()
    if args.probe:
        print(json.dumps(tensorflow_info()))
        return 0
    if args.build_op:
        from .custom_ops.build import as_dict, build

        print(json.dumps({**as_dict(build()), "tensorflow": tensorflow_info()}))
        return 0
    if args.jobs is None or args.out is None:
        parser.error("--jobs and --out are required")
    return run_jobs(args.jobs, args.out)


if __name__ == "__main__":
    sys.exit(main())
