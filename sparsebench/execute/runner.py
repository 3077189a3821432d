"""`sparsebench run`: a suite's cells -> worker processes -> one results file.

Owns the run's life cycle: expanding the suite (or re-reading it from a results file for
`--resume`), writing the header with the run's metadata and the environment fingerprint,
recording every cell as it finishes, and the final summary and exit code.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import __version__, load
from ..errors import UserError
from ..lifetime import EXPOSED_OPT_IN, exposed_opt_in, private_network_problem
from ..machine import environment_differences
from ..plan.cell import Cell
from ..plan.cluster_file import coordinator_cluster, read_cluster
from ..plan.job import BoundRequest, ProfileRequest, RemoteCluster
from ..plan.suite import Suite, load_suite, parse_suite
from ..record import Record
from ..results import ResultsWriter, read_results
from .custom_op import custom_op, needs_custom_op, prebuild, skip_reason, tensorflow_facts
from .env import fingerprint
from .orchestrator import Orchestrator, Outcome, inherited_variables
from .progress import Progress


@dataclass
class RunSummary:
    path: Path
    counts: Counter = field(default_factory=Counter)
    planned: int = 0  # worker runs of a cell (a cell measured in N processes counts N)
    already_done: int = 0
    processes: int = 1
    records: list[Record] = field(default_factory=list)  # this run's, as written

    @property
    def busy_warning(self) -> str | None:
        return load.busy_warning(self.records)

    @property
    def exit_code(self) -> int:
        return 1 if self.counts["failed"] or self.counts["timeout"] else 0

    def line(self) -> str:
        parts = [f"{self.counts[s]} {s}" for s in ("ok", "skipped", "failed", "timeout") if self.counts[s]]
        resumed = f" ({self.already_done} already done)" if self.already_done else ""
        what = "cells" if self.processes == 1 else f"cell processes ({self.processes} per cell)"
        return f"{self.planned} {what} run{resumed}: {', '.join(parts) or 'nothing'}; results in {self.path}"


Schedule = list[tuple[int, list[Cell]]]  # (round, cells to measure in that round)


def plan_rounds(cells: list[Cell], done: set[tuple[str, int]] = frozenset()) -> Schedule:
    """Round r measures every cell that asks for at least r processes, each in a fresh
    process, before round r + 1 starts: slow drift of the machine then hits every cell
    alike instead of the cells that happen to run last."""
    rounds = max((c.measure.processes for c in cells), default=1)
    schedule = []
    for r in range(1, rounds + 1):
        todo = [c for c in cells if c.measure.processes >= r and (c.cell_id, r) not in done]
        if todo:
            schedule.append((r, todo))
    return schedule


def _size(schedule: Schedule) -> int:
    return sum(len(cells) for _, cells in schedule)


def git_revision() -> dict[str, Any] | None:
    """The commit these results belong to, so `history` can place them.

    From the checkout sparsebench runs from (an editable install) when there is one, with
    the commit's own time; otherwise from `SPARSEBENCH_COMMIT` or GitHub Actions'
    `GITHUB_SHA` (a nightly job that installed a checkout with `pip install .`)."""
    root = Path(__file__).resolve().parent.parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if rev.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True,
                                   timeout=10)
            when = subprocess.run(["git", "show", "-s", "--format=%cI", "HEAD"], cwd=root, capture_output=True,
                                  text=True, timeout=10)
            return {"commit": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip()),
                    "committed_at": when.stdout.strip() or None, "source": "checkout"}
    except (OSError, subprocess.SubprocessError):
        pass
    for variable in ("SPARSEBENCH_COMMIT", "GITHUB_SHA"):
        commit = os.environ.get(variable, "").strip()
        if commit:
            return {"commit": commit, "dirty": None, "committed_at": None, "source": variable}
    return None


def prepare(suite_arg: str, overrides: list[str], check_files: bool = True) -> tuple[Suite, list[Cell]]:
    """The suite with its overrides, expanded; with `check_files`, every data file the
    cells name must be readable (one line naming the file, before anything is written)."""
    suite = load_suite(suite_arg)
    for assignment in overrides:
        suite.override(assignment)
    cells = suite.cells()
    if check_files:
        check_data_files(cells)
    return suite, cells


def check_data_files(cells: list[Cell]) -> None:
    for data in {cell.data for cell in cells}:
        data.check_files()


def default_output(suite: Suite) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("results") / f"{suite.name}-{stamp}.jsonl"


def run_header(suite: Suite, suite_arg: str, overrides: list[str], isolation: str, cells: int,
               **extra: Any) -> dict[str, Any]:
    """The `run` part of a results file's header."""
    return {
        "suite": suite.name,
        "suite_arg": suite_arg,
        "suite_source": suite.source,
        "suite_text": suite.text,
        "description": suite.description,
        "overrides": list(overrides),
        "isolation": isolation,
        "command": shlex.join(sys.argv),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sparsebench_version": __version__,
        "git": git_revision(),
        "cells_planned": cells,
        **extra,
    }


def read_cluster_option(cluster: str | None) -> RemoteCluster | None:
    """`--cluster FILE`: the real cluster the PS cells run against, as the job carries it."""
    if cluster is None:
        return None
    return RemoteCluster(coordinator_cluster(read_cluster(cluster), cluster), str(cluster))


def check_cluster_isolation(cells: list[Cell], remote: RemoteCluster | None) -> None:
    """Before any cell runs: local clusters need a private network namespace, or an
    explicit opt-in, because TensorFlow's servers listen on every interface unauthenticated."""
    if remote is not None or exposed_opt_in() or all(c.distribution.is_local for c in cells):
        return
    problem = private_network_problem()
    if problem:
        raise UserError(f"parameter-server cells start TensorFlow servers that listen on every interface and "
                        f"authenticate nothing, so sparsebench runs them in a private network namespace, but "
                        f"{problem}; to run them reachable from your network anyway, set {EXPOSED_OPT_IN}=1")


def slow_header(run_meta: dict[str, Any], cells: list[Cell]) -> dict[str, Any]:
    """The header's slow parts, computed once the results file is known to be writable:
    the custom op's build (where a cell needs it) and the environment fingerprint."""
    run_meta["custom_op"] = prebuild(cells)
    facts = tensorflow_facts(run_meta["custom_op"])
    if facts is None:
        print("environment: probing TensorFlow for the fingerprint (a few seconds)", file=sys.stderr, flush=True)
    environment = fingerprint(tensorflow=facts)
    run_meta["machine_at_start"] = machine_at_start()
    return {"run": run_meta, "environment": environment}


def machine_at_start(seconds: float = 1.0) -> dict[str, Any]:
    """The machine for a second before the first cell (`env --check`), recorded in the
    header; a warning on stderr when it is busy, so nobody waits for a run whose figures
    will be low."""
    found = load.check_machine(seconds)
    for problem in found.problems:
        busiest = ", ".join(f"{name} {cores:.1f}" for name, _, cores in found.busiest[:3])
        print(f"warning: the machine is not quiet before the first cell: {problem}"
              f"{f' ({busiest})' if busiest else ''}; the figures will likely be low and noisy", file=sys.stderr,
              flush=True)
    return {"load": found.load.to_dict() if found.load else None, "load_average": found.load_average,
            "governors": found.frequency.governors, "current_mhz": found.frequency.current_mhz,
            "max_mhz": found.frequency.max_mhz,
            "busiest": [{"name": n, "pid": p, "cores": round(c, 3)} for n, p, c in found.busiest],
            "problems": found.problems}


def run(
    *,
    suite_arg: str | None,
    overrides: list[str],
    output: Path | None = None,
    resume: Path | None = None,
    quiet: bool = False,
    require_gpu: bool = False,
    isolation: str | None = None,
    allow_env_change: bool = False,
    cluster: str | None = None,
    verbose: bool = False,
) -> RunSummary:
    """`sparsebench run`: a new run of `suite_arg` into `output`, or (`resume`) the missing
    and failed cells of a results file; returns the counts and the exit code."""
    adjustments: list[Callable[[Record], Record]] = []
    remote = read_cluster_option(cluster)
    if resume is not None:
        suite, cells, todo, run_meta, writer, note = reopen(resume, suite_arg, overrides, output, require_gpu,
                                                             allow_env_change)
        path = Path(resume)
        if note:
            adjustments.append(lambda record: record.replace(**note))
    else:
        if suite_arg is None:
            raise UserError("run: give --suite NAME|PATH (or --resume RESULTS)")
        suite, cells = prepare(suite_arg, overrides)
        todo = plan_rounds(cells)
        path = Path(output) if output is not None else default_output(suite)
        run_meta = run_header(suite, suite_arg, overrides, isolation or suite.isolation, len(cells),
                              processes=max(c.measure.processes for c in cells),
                              **({"cluster": remote.to_dict()} if remote else {}))
        writer = ResultsWriter(path, lambda: slow_header(run_meta, cells))
    custom_op = run_meta.get("custom_op") if resume is None else prebuild([c for _, cs in todo for c in cs])
    if resume is not None:
        check_data_files([c for _, cs in todo for c in cs])  # as a new run does, before any cell
        if remote is None:  # a resumed run goes back to the cluster it started on
            remote = RemoteCluster.from_dict(run_meta["cluster"]) if run_meta.get("cluster") else None
    check_cluster_isolation([c for _, cs in todo for c in cs], remote)

    def require(record: Record) -> Record:
        if require_gpu and record.status == "skipped" and record.reason == "no GPU":
            record = record.replace(status="failed", reason="no GPU (--require-gpu)")
        for adjust in adjustments:
            record = adjust(record)
        return record

    total = _size(plan_rounds(cells))
    summary = RunSummary(path=path, planned=_size(todo), already_done=total - _size(todo),
                         processes=max(c.measure.processes for c in cells))
    execute(todo, writer=writer, summary=summary, quiet=quiet,
            isolation=isolation or run_meta.get("isolation", suite.isolation), adjust=require, custom_op=custom_op,
            cluster=remote, verbose=verbose)
    return summary


def reopen(path: Path, suite_arg: str | None, overrides: list[str], output: Path | None, require_gpu: bool,
           allow_env_change: bool) -> tuple[Suite, list[Cell], Schedule, dict[str, Any], ResultsWriter, dict]:
    """`--resume`: the run's suite and settings from the file's header, the cells still to
    run, and the file reopened for appending. Refuses whatever would silently change the
    run: new --set or --output, another suite, another machine (unless allowed: then every
    record written now says what changed)."""
    if output is not None:
        raise UserError(f"--resume {path}: the run is completed in that file; drop --output")
    previous = read_results(path)
    run_meta = previous.header.get("run", {})
    if "suite_text" not in run_meta or "suite" not in run_meta:
        raise UserError(f"--resume {path}: its header holds no suite to resume (a profile, or another tool's "
                        f"file); run the suite again")
    check_run_header(path, run_meta)
    # The same command line with --resume added is fine; a --set that differs from the run's is not.
    changed = [o for o in overrides if o not in run_meta.get("overrides", [])]
    if changed:
        raise UserError(f"--resume {path}: --set {changed[0]} is not one of the run's settings "
                        f"({' '.join(run_meta.get('overrides')) or 'none'}); a resumed run keeps the cells its header "
                        f"names: start a new run instead")
    if suite_arg is not None and suite_arg not in (run_meta.get("suite"), run_meta.get("suite_arg")):
        raise UserError(f"--resume {path}: that file holds suite {run_meta.get('suite')!r}, not {suite_arg!r}")
    differences = environment_differences(previous.environment, fingerprint())
    if differences and not allow_env_change:
        raise UserError(f"--resume {path}: this machine is not the one that started the run ("
                        f"{'; '.join(differences)}); resume it there, or pass --allow-env-change")
    suite = parse_suite(run_meta["suite_text"], run_meta.get("suite_source", str(path)), run_meta["suite"])
    for assignment in run_meta.get("overrides", []):
        suite.override(assignment)
    cells = suite.cells()
    done = previous.done_rounds()
    if require_gpu:  # a cell skipped for want of a GPU is not done when a GPU is required
        done -= {(r.cell_id, r.round_number()) for r in previous.records
                 if r.status == "skipped" and r.reason == "no GPU"}
    todo = plan_rounds(cells, done)
    writer = ResultsWriter(path)
    for warning in writer.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    note = {"environment_changed_on_resume": differences} if differences else {}
    return suite, cells, todo, run_meta, writer, note


# What --resume reads from a header, and the type each must have (a hand-edited or damaged
# header fails in one line instead of deep inside the suite parser).
RUN_HEADER_TYPES = {"suite": (str,), "suite_text": (str,), "suite_source": (str, type(None)),
                    "overrides": (list,), "isolation": (str, type(None)), "cluster": (dict, type(None))}


def check_run_header(path: Path, run_meta: dict[str, Any]) -> None:
    for key, types in RUN_HEADER_TYPES.items():
        if key in run_meta and not isinstance(run_meta[key], types):
            raise UserError(f"--resume {path}: header run.{key} is {type(run_meta[key]).__name__} "
                            f"{run_meta[key]!r:.40}, not {' or '.join(t.__name__ for t in types if t is not type(None))}")
    if not all(isinstance(o, str) for o in run_meta.get("overrides", [])):
        raise UserError(f"--resume {path}: header run.overrides must be a list of KEY=VALUE strings")


def execute(schedule: Schedule, *, writer: ResultsWriter, summary: RunSummary, quiet: bool, isolation: str,
            cluster: RemoteCluster | None = None, profile: ProfileRequest | None = None,
            adjust: Callable[[Record], Record] = lambda record: record,
            custom_op: dict[str, Any] | None = None, bound: BoundRequest | None = None,
            verbose: bool = False) -> list[tuple[Cell, Record]]:
    """Run the schedule's rounds through workers, appending each (adjusted) record as it
    arrives; always closes the writer. Cells that need a custom op that could not be built
    are recorded as skipped without a worker. Returns (cell, record) pairs in the order
    they finished."""
    _, dropped = inherited_variables()
    for name, value in dropped.items():
        print(f"warning: {name}={value} in your environment is ignored: each cell sets its own threads and "
              f"oneDNN (axes intra_op_threads, inter_op_threads, omp_num_threads, mkl_num_threads, "
              f"kmp_blocktime, onednn)", file=sys.stderr)
    progress = Progress(_size(schedule), quiet=quiet, processes=summary.processes)
    worker_log = (lambda line: progress.log(f"  worker | {line}")) if verbose else None
    finished: list[tuple[Cell, Record]] = []
    started: dict[str, load.CpuTimes | None] = {}  # cell id -> the machine's CPU times when it started

    def start(cell: Cell) -> None:
        started[cell.cell_id] = load.read_cpu_times()
        progress.start(cell)

    def record(outcome: Outcome) -> None:
        rec = with_machine_load(adjust(outcome.record), started.pop(outcome.cell.cell_id, None))
        writer.append(rec)
        summary.counts[rec.status] += 1
        summary.records.append(rec)
        finished.append((outcome.cell, rec))
        progress.finish(outcome.cell, rec)

    orchestrator = Orchestrator(record=record, isolation=isolation, on_start=start,
                                on_phase=None if quiet else progress.phase,
                                worker_log=worker_log, cluster=cluster,
                                profile=profile, bound=bound)
    unavailable = skip_reason(custom_op)
    try:
        for round_number, cells in schedule:
            if unavailable:
                for cell in [c for c in cells if needs_custom_op(c)]:
                    start(cell)
                    record(Outcome(cell, Record.new(cell, round_number, "skipped", unavailable)))
                cells = [c for c in cells if not needs_custom_op(c)]
            orchestrator.run(cells, round=round_number)
    finally:
        progress.close()
        writer.close()
    return finished


def with_machine_load(record: Record, before: load.CpuTimes | None) -> Record:
    """The record with what the machine did while its cell ran: iowait over the cell and
    the load average at its end (the worker measures other processes and steal itself,
    over its timed windows only)."""
    during = load.between(before, load.read_cpu_times())
    if during is None:
        return record
    return dataclasses.replace(record, iowait_cores=round(during.iowait_cores, 3), load_1m=during.load_1m)


def profile(*, suite_arg: str, overrides: list[str], steps: int, output: Path | None = None, quiet: bool = False,
            isolation: str | None = None) -> tuple[Path, list[tuple[Cell, Record]], RunSummary]:
    """Profile every cell of a suite; per cell the worker writes DIR/<cell_id>/{plugins,ops.*,trace.json}.

    The records (with each cell's op table) also go to DIR/results.jsonl, so `report`
    can show them later.
    """
    if steps < 1:
        raise UserError(f"--steps: must be >= 1, got {steps}")
    suite, cells = prepare(suite_arg, overrides)
    folder = Path(output) if output is not None else Path("results") / f"profile-{suite.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = folder / "results.jsonl"
    run_meta = run_header(suite, suite_arg, overrides, isolation or suite.isolation, len(cells), profile_steps=steps)
    writer = ResultsWriter(path, lambda: slow_header(run_meta, cells))
    summary = RunSummary(path=path, planned=len(cells))
    profiled = execute([(1, cells)], writer=writer, summary=summary, quiet=quiet, isolation=run_meta["isolation"],
                       custom_op=run_meta["custom_op"], profile=ProfileRequest(steps, str(folder.resolve())))
    return folder, profiled, summary


def bound(*, suite_arg: str, overrides: list[str], output: Path | None = None, quiet: bool = False,
          isolation: str | None = None) -> tuple[Path, list[tuple[Cell, Record]], RunSummary]:
    """Every cell's memory bound alone (its input opened, its key stream replayed; no model
    trained), each in a worker with the cell's threads; records to DIR/results.jsonl."""
    suite, cells = prepare(suite_arg, overrides)
    folder = Path(output) if output is not None else Path("results") / f"bound-{suite.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = folder / "results.jsonl"
    run_meta = run_header(suite, suite_arg, overrides, isolation or suite.isolation, len(cells), bound_only=True)
    op = custom_op("build", tensorflow_facts=True)  # the replay is in the op library, whatever the cell's variant
    facts = tensorflow_facts(op)
    if not op.get("ok"):
        raise UserError(f"bound: the replay needs the fused op library: {skip_reason(op)}")
    run_meta["custom_op"] = op
    writer = ResultsWriter(path, lambda: {"run": run_meta, "environment": fingerprint(tensorflow=facts)})
    summary = RunSummary(path=path, planned=len(cells))
    measured = execute([(1, cells)], writer=writer, summary=summary, quiet=quiet, isolation=run_meta["isolation"],
                       custom_op=op, bound=BoundRequest())
    return folder, measured, summary
