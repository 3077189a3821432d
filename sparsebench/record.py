"""One result record: the typed contract between a worker, the results file and its readers.

A worker process writes one `Record` per cell it ran; the orchestrator writes one itself
where no worker could (a crash, a timeout, a cell skipped before any worker started).
A cell measured in N processes (`processes = N`) has N such records, one per `round`;
`merge_rounds` turns them into one record for the cell, field by field, by the rule each
field declares below. Every field is declared once, with its unit, its merge rule and
what it means; `docs/results-format.md` is checked against these declarations by a test.

Four things are called a rate, and they are kept apart:
- the **process rate** (`process_rate`): the median of one process's windows; it is
  `samples_per_sec` in a process's record;
- the **cell rate** (`cell_rate`): the median of all windows of all a cell's ok processes,
  pooled; it is `samples_per_sec` in a merged record (`Results.latest()`), which
  `report` and `compare` show; `compare` recomputes it from the stored windows;
- the **round rate** (`round_rate`): in `sparsebench ab`, one side's figure for one round,
  which is the process rate of the one process that side ran that round;
- each **window rate** (`windows`): the samples of one window over its wall seconds.

In JSON a record is a flat object; a field that is null may be absent (readers treat the
two alike). Keys this version does not know (written by a newer one) are kept in `extra`
and written back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, Callable, Iterable

from . import stats

DONE_STATUSES = ("ok", "skipped")
STATUSES = ("ok", "skipped", "failed", "timeout")

# A pipeline cell is input-bound when its timed steps waited this share of the windows for
# a batch, or its pipeline alone delivered less than this multiple of the training rate.
INPUT_WAIT_BOUND = 0.2
INPUT_BOUND_MARGIN = 1.2
INPUT_CPU_BOUND = 0.5  # the pipeline needs half the cell's cores at the training rate: it competes with training


class Merge(str, Enum):
    """How one field of a cell's per-process records becomes the merged record's field."""

    SAME = "same"  # a setting or fact of the cell, equal in every process: the first is kept
    MEDIAN = "median"  # a per-process figure: the median over the ok processes
    MAX = "max"  # a peak: the largest over the ok processes
    FIRST = "first"  # the first ok process's value (fields only ever measured in one process)
    EACH = "each"  # kept per process: the merged record holds the list of the ok processes' values
    WINDOWS = "windows"  # every ok process's windows pooled (each process's own in process_windows)
    SUMMARY = "summary"  # computed by the merge itself from all the processes
    DERIVED = "derived"  # recomputed from the merged record's other fields
    PROCESS = "process"  # describes one process (a failure's traceback): absent from the merged record


MERGE_MEANINGS = {
    Merge.SAME: "must agree across processes; the first is kept, a disagreement is listed in `disagreements`",
    Merge.MEDIAN: "median over the ok processes",
    Merge.MAX: "largest over the ok processes",
    Merge.FIRST: "the first ok process's value",
    Merge.EACH: "per-process list: the ok processes' values in round order",
    Merge.WINDOWS: "the ok processes' windows pooled, in round order",
    Merge.SUMMARY: "computed from all the processes by the merge",
    Merge.DERIVED: "recomputed from the merged fields",
    Merge.PROCESS: "not merged: only in the per-process records",
}


def _field(unit: str, merge: Merge, doc: str, derive: Callable[["Record"], Any] | None = None):
    return field(default=None, metadata={"unit": unit, "merge": merge, "doc": doc, "derive": derive})


def input_bound_verdict(wait_share: float | None, alone: float | None, trained: float | None,
                        cpu_share: float | None = None) -> bool | None:
    """Whether training waited for its input, or its input took the CPU training needed
    (None where the figures are missing; `cpu_share` is absent from older records)."""
    if wait_share is None or alone is None or trained is None:
        return None
    return bool(wait_share >= INPUT_WAIT_BOUND or alone < INPUT_BOUND_MARGIN * trained
                or (cpu_share is not None and cpu_share >= INPUT_CPU_BOUND))


def _derive_input_bound(record: "Record") -> bool | None:
    return input_bound_verdict(record.input_wait_share, record.input_samples_per_sec, record.samples_per_sec,
                               record.input_cpu_share)


def _derive_bound_share(record: "Record") -> float | None:
    rate, bound = record.samples_per_sec, record.bound_samples_per_sec
    if rate is None or bound is None or bound <= 0:
        return None
    return rate / bound


# Fields written even when null (every reader may index them).
ALWAYS_WRITTEN = ("cell_id", "axes", "cell", "round", "status", "reason")
# Fields every record of this tool has had a value for: null there is damage, not "unknown"
# (report's axes and compare's thread settings would silently read as missing).
NEVER_NULL = ("cell_id", "status", "axes")


@dataclass
class Record:
    """One cell's result: of one process, or (merged) of all the cell's processes."""

    # -- what was run -----------------------------------------------------------------
    cell_id: str = _field("", Merge.SAME, "the cell's stable id: its label and a hash of its identity")
    axes: dict = _field("", Merge.SAME, "the cell's flat axis values (variant, batch_size, ...), as `report` shows them")
    cell: dict = _field("", Merge.SAME, "the whole cell as the worker received it (plan.cell.Cell.to_dict)")
    round: int = _field("", Merge.SUMMARY, "which of the cell's processes this is (1..N); null in a merged "
                                           "record, whose processes are listed in `rounds`")
    status: str = _field("", Merge.SUMMARY, "ok, skipped, failed or timeout; merged: ok when any process is ok, "
                                            "else the last process's")
    reason: str = _field("", Merge.SUMMARY, "why the cell is not ok (one line); null when ok")
    error: str = _field("", Merge.PROCESS, "a skipped cell's full message")
    traceback: str = _field("", Merge.PROCESS, "a failed cell's Python traceback")
    isolation: str = _field("", Merge.SAME, "cell (one process per cell) or env (cells with equal process settings "
                                            "shared one process)")
    # -- throughput ---------------------------------------------------------------------
    samples_per_sec: float = _field("samples/s", Merge.SUMMARY,
                                    "a process's record: the process rate (median of its windows); merged: the "
                                    "cell rate (median of all ok processes' windows pooled)")
    samples_per_sec_low: float = _field("samples/s", Merge.SUMMARY,
                                        "low end of the 95% bootstrap interval of samples_per_sec (merged: "
                                        "hierarchical, processes then windows)")
    samples_per_sec_high: float = _field("samples/s", Merge.SUMMARY, "high end of that interval")
    cv: float = _field("fraction", Merge.SUMMARY, "coefficient of variation of the windows (merged: all pooled)")
    windows: list = _field("samples/s", Merge.WINDOWS, "every timed window's rate: samples over wall seconds")
    window_seconds: list = _field("s", Merge.EACH, "each window's wall seconds")
    window_steps: list = _field("steps", Merge.EACH, "each window's train steps (all Hogwild workers together)")
    steps_timed: int = _field("steps", Merge.EACH, "steps timed over all windows")
    window_cpu_seconds: list = _field("s", Merge.EACH, "each window's CPU seconds (user + system) of the worker "
                                                     "process, every thread; of the coordinator and its local "
                                                     "cluster's tasks for a PS cell")
    cpu_windows: list = _field("samples/CPU-s", Merge.EACH, "each window's samples over its CPU seconds")
    cpu_samples_per_sec: float = _field("samples/CPU-s", Merge.MEDIAN, "a process's CPU rate: the median of its "
                                                                        "cpu_windows; merged: the median over the "
                                                                        "processes")
    cpu_busy_cores: float = _field("cores", Merge.MEDIAN, "CPU seconds over wall seconds of the timed windows: how "
                                                          "many cores the cell kept busy")
    thread_cpu_seconds: dict = _field("s", Merge.EACH, "CPU seconds per thread name over the timed windows "
                                                       "(local cells; tf_Compute is TensorFlow's inter-op pool)")
    other_cores: float = _field("cores", Merge.MAX, "the most cores' worth of CPU other processes on the machine "
                                                    "used during one of the timed windows (local cells)")
    steal_cores: float = _field("cores", Merge.MAX, "the most cores' worth the hypervisor gave other guests "
                                                    "(steal time) during one of the timed windows")
    iowait_cores: float = _field("cores", Merge.MAX, "cores' worth of time the machine's CPUs waited on I/O over "
                                                     "the whole cell (start-up included), as the orchestrator saw it")
    load_1m: float = _field("", Merge.MAX, "the machine's 1-minute load average when the cell finished (its own "
                                           "worker included)")
    step_ms_p50: float = _field("ms", Merge.MEDIAN, "median wall time of one train step")
    step_ms_p90: float = _field("ms", Merge.MEDIAN, "90th percentile of the step time")
    step_ms_p99: float = _field("ms", Merge.MEDIAN, "99th percentile of the step time")
    # -- quality ------------------------------------------------------------------------
    quality_steps: int = _field("steps", Merge.SAME, "train steps from the initial weights behind loss, eval_loss and "
                                                     "auc (the quality phase, before the timing; the suite's "
                                                     "quality_steps, rounded up to whole PS functions)")
    loss: float = _field("", Merge.MEDIAN, "mean training loss of the last (up to 20) quality-phase steps")
    eval_loss: float = _field("", Merge.MEDIAN, "loss on the held-out set after the quality phase")
    auc: float = _field("", Merge.MEDIAN, "ROC AUC on the held-out set after the quality phase")
    # -- resources and the model's shape ----------------------------------------------
    peak_rss_mb: float = _field("MiB", Merge.MAX, "the worker process's peak resident memory")
    huge_pages_mb: float = _field("MiB", Merge.MEDIAN, "the worker's anonymous memory backed by transparent huge "
                                                       "pages after its timed windows (AnonHugePages): where the "
                                                       "kernel placed the tables")
    grad_type: str = _field("", Merge.SAME, "the sparse table's gradient type: dense or IndexedSlices")
    rows_touched: float = _field("rows", Merge.MEDIAN, "table rows the optimizer writes per step (mean of the "
                                                       "diagnostic steps)")
    rows_touched_per_step: list = _field("rows", Merge.EACH, "rows touched in each diagnostic step")
    num_features: int = _field("rows", Merge.SAME, "rows of the sparse table (2**feature_bits)")
    avg_nnz_per_batch: float = _field("entries", Merge.SAME, "mean nonzero entries per batch of the batch pool")
    threads_in_effect: dict = _field("", Merge.SAME, "thread settings as TensorFlow reports them and as the kernel "
                                                     "counts the process's threads")
    update_path: str = _field("", Merge.SAME, "fused (the custom op's own update) or optimizer")
    phases: dict = _field("s", Merge.EACH, "seconds spent per phase: data, build, warm-up, measure, ...")
    variables_mb: dict = _field("MiB", Merge.SAME, "size of each trainable variable")
    calibrated_features: int = _field("features", Merge.SAME, "features the discretizer calibrated bins for (null "
                                                              "without a discretizer)")
    data_source: dict = _field("", Merge.SAME, "for data from files: what was read (examples, malformed ones, the "
                                               "held-out set); null for synthetic data")
    # -- input pipeline -----------------------------------------------------------------
    input_samples_per_sec: float = _field("samples/s", Merge.MEDIAN, "a pipeline cell's input pipeline alone "
                                                                     "(median of its windows)")
    input_windows: list = _field("samples/s", Merge.EACH, "each window of the pipeline timed alone")
    input_wait_share: float = _field("fraction", Merge.MEDIAN, "share of the timed windows the train loop waited "
                                                               "for a batch")
    input_cpu_us_per_example: float = _field("µs", Merge.MEDIAN, "CPU time (all threads of the worker) per example "
                                                                "while the pipeline ran alone")
    input_cpu_share: float = _field("fraction", Merge.MEDIAN, "share of the cell's intra-op cores the pipeline needs "
                                                              "at the training rate: input_cpu_us_per_example x "
                                                              "samples_per_sec / intra-op threads")
    input_bound: bool = _field("", Merge.DERIVED, "waited >= 20% of the windows, or the pipeline alone gave < 1.2x "
                                                  "the training rate, or it needs >= 50% of the cell's cores at the "
                                                  "training rate", derive=_derive_input_bound)
    # -- the memory bound -----------------------------------------------------------------
    bound_samples_per_sec: float = _field("samples/s", Merge.MEDIAN, "the cell's memory bound: samples/s at which its "
                                                                     "layer's memory traffic alone runs, replaying its "
                                                                     "own batches with its threads after the windows "
                                                                     "(train/measure/bound.py); median of its windows")
    bound_windows: list = _field("samples/s", Merge.EACH, "each window's rate (3 to 5 windows of whole replay "
                                                          "passes over the batch pool)")
    bound_bytes_per_sample: float = _field("bytes", Merge.MEDIAN, "bytes one sample must move at the least: rows read "
                                                                  "by the forward pass, rows read and written by the "
                                                                  "update (and their per-key scalars)")
    bound_gb_per_sec: float = _field("GB/s", Merge.MEDIAN, "the memory traffic the replay sustained (10^9 bytes/s)")
    bound_reason: str = _field("", Merge.FIRST, "why the cell has no memory bound (the op library is unavailable, "
                                                "a parameter-server cell, ...)")
    bound_share: float = _field("fraction", Merge.DERIVED, "samples_per_sec over bound_samples_per_sec: how close the "
                                                          "cell runs to its memory bound", derive=_derive_bound_share)
    # -- what the layer was fed -----------------------------------------------------------
    nonfinite_inputs: int = _field("values", Merge.SAME, "NaN or infinite values among the cell's batch pool and "
                                                         "held-out set (the layer and the stock ops pass them on: a "
                                                         "NaN poisons its rows, an inf sets its key's maximum); null "
                                                         "for pipeline cells, whose parser refuses them as bad lines")
    custom_op_build: dict = _field("", Merge.SAME, "the fused op library the cell loaded: its target (native, "
                                                   "portable or a -march), compiler flags and cache key")
    # -- parameter servers --------------------------------------------------------------
    samples_per_sec_per_worker_mean: float = _field("samples/s", Merge.MEDIAN, "samples_per_sec over worker tasks")
    samples_per_sec_per_worker: dict = _field("samples/s", Merge.EACH, "each worker task's own rate (its step count)")
    cluster: dict = _field("", Merge.EACH, "the cluster: tasks, hosts, placement, bytes per step per PS task, lost "
                                           "workers")
    # -- GPU ----------------------------------------------------------------------------
    gpu_util_pct: float = _field("%", Merge.MEDIAN, "mean GPU utilization over the windows (NVML)")
    gpu_mem_used_mb: float = _field("MiB", Merge.MAX, "largest GPU memory in use over the windows (NVML)")
    gpu_samples: int = _field("samples", Merge.EACH, "NVML readings taken")
    gpu_error: str = _field("", Merge.EACH, "why NVML could not be read")
    gpu_peak_mb: float = _field("MiB", Merge.MAX, "TensorFlow's peak GPU memory (profiled cells)")
    # -- counted work (ab --count) ---------------------------------------------------------
    counted_steps: int = _field("steps", Merge.SAME, "train steps counted under callgrind, each on its own")
    counted_step_instructions: list = _field("instructions", Merge.EACH, "each counted step's instructions, in step "
                                                                         "order, without the idle ones")
    counted_step_cycles: list = _field("cycles", Merge.EACH, "each counted step's estimated cycles, in step order, "
                                                             "without the idle ones")
    counted_step_idle_instructions: list = _field("instructions", Merge.EACH, "each counted step's idle instructions "
                                                                              "(a pool thread spinning or waiting for "
                                                                              "work), left out of the counted figures")
    instructions_per_example: float = _field("instructions", Merge.MEDIAN, "instructions executed per example in "
                                                                           "the median counted step (idle left out)")
    cycles_per_example: float = _field("cycles", Merge.MEDIAN, "estimated cycles per example (the median step): "
                                                               "instructions + 10 x simulated L1 misses + 100 x "
                                                               "last-level misses")
    count_events: dict = _field("events", Merge.FIRST, "every callgrind event per example (Ir, Dr, Dw, I1mr, D1mr, "
                                                       "D1mw, ILmr, DLmr, DLmw)")
    count_functions: dict = _field("events", Merge.FIRST, "the costliest functions (by estimated cycles): their own "
                                                          "instructions and cycles per example")
    # -- profiles -----------------------------------------------------------------------
    profile_dir: str = _field("", Merge.FIRST, "where `sparsebench profile` wrote this cell's profile")
    profile: dict = _field("", Merge.FIRST, "the profile's op table and step time")
    # -- provenance ---------------------------------------------------------------------
    environment_changed_on_resume: list = _field("", Merge.EACH, "what differed from the run's fingerprint when "
                                                                 "this record was written by --allow-env-change")
    recorded_at: float = _field("unix s", Merge.EACH, "when the record was written")
    worker: dict = _field("", Merge.EACH, "the worker process: pid, seconds, start-up times, threads requested")
    tensorflow: dict = _field("", Merge.SAME, "the worker's TensorFlow: version and build facts")
    non_finite: list = _field("", Merge.EACH, "fields whose measured value was NaN or infinite (JSON stores them as "
                                              "null): a diverged loss, an AUC of a model that outputs NaN")
    # -- merged records only ------------------------------------------------------------
    rounds: list = _field("", Merge.SUMMARY, "the rounds (processes) that were ok")
    processes: int = _field("processes", Merge.SUMMARY, "how many processes measured the cell (0: none was ok)")
    process_windows: list = _field("samples/s", Merge.SUMMARY, "each ok process's windows")
    process_medians: list = _field("samples/s", Merge.SUMMARY, "each ok process's process rate")
    within_process_cv: float = _field("fraction", Merge.SUMMARY, "root mean square of each process's windows' CV")
    between_process_cv: float = _field("fraction", Merge.SUMMARY, "CV of the process rates (null with one process)")
    run_to_run_measured: bool = _field("", Merge.SUMMARY, "more than one process: the interval includes "
                                                          "run-to-run noise")
    failed_rounds: list = _field("", Merge.SUMMARY, "the processes that were not ok: round, status, reason")
    disagreements: list = _field("", Merge.SUMMARY, "fields that should agree across processes and did not")
    # Keys written by a newer sparsebench: kept and written back as they are.
    extra: dict = field(default_factory=dict, metadata={"unit": "", "merge": Merge.EACH, "doc": "unknown keys"})

    # -- construction -------------------------------------------------------------------
    @classmethod
    def new(cls, cell, round: int, status: str, reason: str | None = None, **measured: Any) -> "Record":
        """The one constructor: a record of `cell` (a plan.cell.Cell) measured in process
        `round`, as the worker, the orchestrator and the runner make them."""
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        unknown = sorted(set(measured) - set(FIELD_NAMES))
        if unknown:
            raise TypeError(f"Record has no field {unknown[0]!r} (declare it in sparsebench/record.py)")
        recorded_at = measured.pop("recorded_at", None) or time.time()
        return cls(cell_id=cell.cell_id, axes=cell.axes(), cell=cell.to_dict(), round=round, status=status,
                   reason=reason, **measured, recorded_at=recorded_at)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Record":
        """A record read from JSON; keys this version does not declare go to `extra`.
        RecordTypeError names the first field whose value has the wrong type."""
        known = {k: v for k, v in data.items() if k in FIELD_NAMES and k != "extra"}
        for name, value in known.items():
            if value is None and name in NEVER_NULL:
                raise RecordTypeError(f"field {name!r}: null, but every record names its cell here")
            problem = _type_problem(FIELD_TYPES[name], FIELD_UNITS[name], value)
            if problem:
                raise RecordTypeError(f"field {name!r}: {problem}")
        extra = {k: v for k, v in data.items() if k not in FIELD_NAMES or k == "extra"}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON writes it: declared fields in order (nulls omitted but for
        ALWAYS_WRITTEN), then the unknown keys."""
        out = {}
        for f in FIELDS:
            value = getattr(self, f.name)
            if f.name == "extra" or (value is None and f.name not in ALWAYS_WRITTEN):
                continue
            out[f.name] = value
        out.update(self.extra)
        return out

    def get(self, name: str, default: Any = None) -> Any:
        """A field by name (None -> default), for readers that pick fields by a name they hold."""
        value = getattr(self, name, None) if name in FIELD_NAMES else self.extra.get(name)
        return default if value is None else value

    def replace(self, **changes: Any) -> "Record":
        return dataclasses.replace(self, **changes)

    def noting_non_finite(self) -> "Record":
        """This record with its NaN and infinite figures named in `non_finite`: JSON has no
        NaN, so the file stores null, and null alone would read as "not measured"."""
        found = [f.name for f in FIELDS
                 if isinstance(getattr(self, f.name), float) and not math.isfinite(getattr(self, f.name))]
        if not found:
            return self
        return self.replace(non_finite=sorted({*(self.non_finite or []), *found}))

    def not_finite(self, name: str) -> bool:
        """Whether field `name` was NaN or infinite when measured (in any process, merged)."""
        marks = self.non_finite or []
        return name in marks or any(isinstance(m, list) and name in m for m in marks)

    # -- views --------------------------------------------------------------------------
    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def done(self) -> bool:
        return self.status in DONE_STATUSES

    @property
    def merged(self) -> bool:
        """A cell's merged record (from `merge_rounds`), not one process's."""
        return self.processes is not None

    def round_number(self) -> int:
        return self.round if self.round is not None else 1


FIELDS = tuple(fields(Record))
FIELD_NAMES = tuple(f.name for f in FIELDS)
FIELD_TYPES = {f.name: str(f.type) for f in FIELDS}
FIELD_UNITS = {f.name: f.metadata["unit"] for f in FIELDS}


class RecordTypeError(ValueError):
    """A stored record whose field holds a value of the wrong type (a hand-edited or
    damaged file): the reader names it instead of failing somewhere downstream."""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_problem(annotation: str, unit: str, value: Any) -> str | None:
    """Why `value` cannot be a field declared `annotation` (None: it can). JSON has no
    NaN, so a float field is a number or null; a list with a unit holds numbers (or, for
    per-process lists, lists of numbers)."""
    if value is None:
        return None
    expected = {"str": (str, "a string"), "int": (int, "an integer"), "float": (float, "a number"),
                "bool": (bool, "true or false"), "list": (list, "a list"), "dict": (dict, "an object")}
    kind, words = expected.get(annotation, (object, ""))
    if kind is float:
        ok = _is_number(value)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        return f"expected {words}, got {json_type(value)}"
    if kind is list and unit:
        for item in value:
            items = item if isinstance(item, list) else [item]
            if not all(v is None or _is_number(v) for v in items):
                return f"expected a list of numbers ({unit}), got an element {json_type(item)}"
    return None


def json_type(value: Any) -> str:
    """A value's JSON type in words, with the value where it is short (for error messages)."""
    if value is None:
        return "null"
    name = {str: "string", bool: "boolean", int: "number", float: "number", list: "list", dict: "object"}.get(
        type(value), type(value).__name__)
    text = json.dumps(value, default=str)
    shown = text if len(text) <= 20 else ""
    return f"{name} {shown}".strip()


def declarations() -> list[dict[str, str]]:
    """Every field's name, unit, merge rule and meaning (what docs/results-format.md lists)."""
    return [{"name": f.name, "unit": f.metadata["unit"], "merge": f.metadata["merge"].value, "doc": f.metadata["doc"]}
            for f in FIELDS if f.name != "extra"]


# -- rates ------------------------------------------------------------------------------
def usable_windows(windows: Iterable[Any]) -> list[float]:
    """The window rates a statistic can use: finite numbers above zero. A results file stores
    a NaN window as null (JSON has no NaN), and a stalled or hand-edited one as 0; either
    would crash or poison a median, a log and a change-point search."""
    return [float(w) for w in windows if _is_number(w) and math.isfinite(w) and w > 0]


def process_rate(windows: Iterable[float]) -> float:
    """One process's rate: the median of its windows."""
    values = list(windows)
    return float(statistics.median(values)) if values else float("nan")


def cell_rate(process_windows: Iterable[Iterable[float]]) -> float:
    """A cell's rate: the median of all its processes' windows, pooled."""
    return process_rate(w for windows in process_windows for w in windows)


def round_rate(record: Record) -> float | None:
    """One side's figure for one round of `sparsebench ab`: the process rate of that round's
    process (as its worker recorded it)."""
    return record.samples_per_sec


def round_cpu_rate(record: Record) -> float | None:
    """The same in samples per CPU-second: the process's CPU rate."""
    return record.cpu_samples_per_sec


# -- merging ----------------------------------------------------------------------------
def merge_rounds(rounds: dict[int, Record], record_type: type = Record) -> Record:
    """One cell's per-process records -> one record, each field merged by its declared rule.

    The throughput summary uses the process as the unit: the median of all windows, the
    hierarchical bootstrap interval, the within- and between-process spread,
    `run_to_run_measured` (more than one process). Processes that did not finish are
    listed in `failed_rounds`; the cell is ok when at least one process is."""
    ordered = [rounds[r] for r in sorted(rounds)]
    ok = [rec for rec in ordered if rec.ok]
    failures = [{"round": rec.round_number(), "status": rec.status, "reason": rec.reason}
                for rec in ordered if not rec.done]
    declared = fields(record_type)
    if not ok:
        return dataclasses.replace(ordered[-1], processes=0, run_to_run_measured=False, failed_rounds=failures)
    values: dict[str, Any] = {}
    disagreements = []
    derived = []
    for f in declared:
        rule = f.metadata.get("merge")
        if rule is None:
            raise TypeError(f"{record_type.__name__}.{f.name} declares no merge rule")
        each = [getattr(rec, f.name) for rec in ok]
        present = [v for v in each if v is not None]
        if rule is Merge.SAME:
            values[f.name] = present[0] if present else None
            if any(v != present[0] for v in present[1:]):
                disagreements.append(f.name)
        elif rule is Merge.MEDIAN:
            numbers = [v for v in present if isinstance(v, (int, float)) and not isinstance(v, bool)]
            values[f.name] = float(statistics.median(numbers)) if numbers else None
        elif rule is Merge.MAX:
            numbers = [v for v in present if isinstance(v, (int, float)) and not isinstance(v, bool)]
            values[f.name] = max(numbers) if numbers else None
        elif rule is Merge.FIRST:
            values[f.name] = present[0] if present else None
        elif rule is Merge.EACH:
            if f.name == "extra":
                values[f.name] = {k: v for rec in ok for k, v in rec.extra.items()}
            else:
                values[f.name] = each if present else None
        elif rule is Merge.WINDOWS:
            values[f.name] = [w for v in each for w in (v or [])]
        elif rule is Merge.PROCESS:
            values[f.name] = None
        elif rule is Merge.DERIVED:
            derived.append(f)
        elif rule is not Merge.SUMMARY:
            raise TypeError(f"{record_type.__name__}.{f.name}: unknown merge rule {rule!r}")
    process_windows = [list(rec.windows or []) for rec in ok]
    summary = stats.summarize_processes(process_windows)
    values.update({
        "round": None,
        "status": "ok",
        "reason": None,
        "rounds": [rec.round_number() for rec in ok],
        "process_windows": process_windows,
        "process_medians": [rec.samples_per_sec for rec in ok],
        "samples_per_sec": summary["median"],
        "samples_per_sec_low": summary["low"],
        "samples_per_sec_high": summary["high"],
        "cv": summary["cv"],
        "within_process_cv": summary["within_cv"],
        "between_process_cv": summary["between_cv"],
        "processes": summary["processes"],
        "run_to_run_measured": summary["run_to_run_measured"],
        "failed_rounds": failures,
        "disagreements": disagreements or None,
    })
    merged = record_type(**{f.name: values.get(f.name) for f in declared if f.name in values})
    for f in derived:
        setattr(merged, f.name, f.metadata["derive"](merged))
    return merged
