"""The results file: versioned, append-only, crash-safe.

Format: JSON Lines. Line 1 is the header (`schema`, `version`, the run's metadata and the
environment fingerprint); every further line is one cell's record, appended, flushed and
fsynced as the cell finishes, so a crash, a `kill -9` or Ctrl-C loses at most the cell that
was running. A half-written last line (the process died mid-write) is ignored with a
warning; a damaged line elsewhere is an error naming the file and line.

Every record is a `record.Record`: its fields, units and merge rules are declared there
and listed in docs/results-format.md. A cell measured in several worker processes
(`processes = N`) has one record per process, each with its `round` (1..N);
`Results.latest()` merges them into one record per cell whose summary treats the process
as the unit of repetition (`record.merge_rounds`). A (cell, round) may have several
records (a failed process re-run by `--resume`): the last one wins.

Format history (bump VERSION and add a line on any incompatible change; older versions
are read through an explicit upgrade step):
- 1 (2026-11): first version.
- 2 (2026-11): records carry `round`; several records per cell, one per process.
  Upgrade from 1: every record is round 1.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import UserError
from .record import STATUSES, Record, RecordTypeError, json_type, merge_rounds

SCHEMA = "sparsebench-results"
VERSION = 2
READABLE_VERSIONS = (1, 2)

# The flat view of a record that `report --format json` prints and `compare` reads.
# These names are a contract with users' CI scripts: add keys, never rename them.
JSON_KEYS = (
    "cell_id", "suite", "variant", "shards", "partition_strategy", "batch_size", "optimizer", "device",
    "intra_op_threads", "inter_op_threads", "omp_num_threads", "mkl_num_threads", "onednn", "workers",
    "learning_rate", "out_dim", "discretizer", "normalization", "kmp_blocktime",
    "status", "reason", "samples_per_sec", "samples_per_sec_low", "samples_per_sec_high", "windows", "cv",
    "step_ms_p50", "step_ms_p90", "step_ms_p99", "loss", "eval_loss", "auc", "peak_rss_mb", "grad_type",
    "rows_touched", "gpu_util_pct", "gpu_mem_used_mb", "isolation",
    "processes", "within_process_cv", "between_process_cv", "run_to_run_measured", "update_path",
    "strategy", "ps_tasks", "worker_tasks", "input", "data_format", "input_samples_per_sec", "input_bound",
    "cpu_samples_per_sec", "cpu_busy_cores", "bound_samples_per_sec", "bound_share", "nonfinite_inputs",
    "input_cpu_us_per_example", "input_cpu_share", "text_parser",
)


class ResultsError(UserError):
    """A results file that cannot be read or written."""


def clean_json(value: Any) -> Any:
    """NaN/inf are not JSON: store them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    return value


class ResultsWriter:
    """Appends records to a results file, one durable line at a time."""

    def __init__(self, path: Path, header: Callable[[], dict[str, Any]] | None = None):
        """Create `path` and write `header()`, or (header None) open an existing file to append.

        The header is a callable so an unwritable path fails at once, before the slow
        parts of the header (the environment fingerprint) are computed.
        """
        self.path = Path(path)
        self.warnings: list[str] = []
        try:
            if header is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = open(self.path, "x")
            else:
                self._drop_torn_last_line()
                self._fh = open(self.path, "a")
        except FileExistsError:
            raise ResultsError(f"{self.path}: already exists; choose another --output or use --resume") from None
        except OSError as exc:
            raise ResultsError(f"{self.path}: cannot write results: {exc.strerror}") from None
        try:  # one writer per file: a second `--resume` of a running run would record its cells twice
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.close()
            raise ResultsError(f"{self.path}: another sparsebench is writing this file; let it finish (or stop it) "
                               f"before resuming") from None
        if header is not None:
            self._write({"schema": SCHEMA, "version": VERSION, **header()})

    def _drop_torn_last_line(self) -> None:
        """A process killed mid-write leaves a last line without its newline; appending
        after it would glue the next record onto it and corrupt the file. Cut it off (it
        was never readable: `read_results` ignores it)."""
        with open(self.path, "rb+") as fh:
            data = fh.read()
            if not data or data.endswith(b"\n"):
                return
            keep = data.rfind(b"\n") + 1
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())
        self.warnings.append(f"{self.path}: dropped an incomplete last line ({len(data) - keep} bytes) left by an "
                             f"interrupted run")

    def _write(self, payload: dict[str, Any]) -> None:
        try:
            self._fh.write(json.dumps(clean_json(payload), allow_nan=False) + "\n")
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as exc:
            raise ResultsError(f"{self.path}: cannot append a record: {exc.strerror}; the records before it are "
                               f"saved (complete the run with --resume once the disk is writable)") from None

    def append(self, record: Record) -> None:
        self._write(record.noting_non_finite().to_dict())

    def close(self) -> None:
        try:
            self._fh.close()
        except OSError:
            pass  # the failed write already raised, with its message

    def __enter__(self) -> "ResultsWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


@dataclass
class Results:
    path: Path
    header: dict[str, Any]
    records: list[Record]  # every record (one per cell and process), in file order
    warnings: list[str] = field(default_factory=list)

    def by_round(self) -> dict[str, dict[int, Record]]:
        """cell id -> round -> that process's record (the last one written), first-seen order."""
        cells: dict[str, dict[int, Record]] = {}
        for record in self.records:
            cells.setdefault(record.cell_id, {})[record.round_number()] = record
        return cells

    def latest(self) -> list[Record]:
        """One merged record per cell (`record.merge_rounds`), in first-seen order."""
        return [merge_rounds(rounds) for rounds in self.by_round().values()]

    def done_rounds(self) -> set[tuple[str, int]]:
        """(cell id, round) pairs whose process finished (`ok` or `skipped`)."""
        return {(cid, r) for cid, rounds in self.by_round().items() for r, rec in rounds.items() if rec.done}

    @property
    def environment(self) -> dict[str, Any]:
        return self.header.get("environment", {})


def _upgrade(version: int, record: dict[str, Any]) -> dict[str, Any]:
    """A record of an older format in today's shape."""
    if version == 1:
        record = {**record, "round": 1}
    return record


def read_results(path: str | Path) -> Results:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ResultsError(f"{path}: no such results file") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ResultsError(f"{path}: cannot read results file: {exc}") from None
    lines = text.split("\n")
    complete, trailing = lines[:-1], lines[-1]  # text written by us always ends in "\n"
    warnings = []
    if trailing.strip():
        warnings.append(f"{path}: ignored an incomplete last line (the run was interrupted while writing it)")
    if not complete:
        raise ResultsError(f"{path}: empty results file")
    try:
        header = json.loads(complete[0])
    except json.JSONDecodeError:
        raise ResultsError(f"{path}:1: not a sparsebench results file (header is not JSON)") from None
    if not isinstance(header, dict) or header.get("schema") != SCHEMA:
        raise ResultsError(f"{path}:1: not a sparsebench results file (schema {header.get('schema') if isinstance(header, dict) else None!r})")
    version = header.get("version")
    for key in ("run", "environment"):
        if key in header and not isinstance(header[key], dict):
            raise ResultsError(f"{path}:1: corrupt header ({key!r} is {json_type(header[key])}, not an object)")
    if version not in READABLE_VERSIONS:
        raise ResultsError(f"{path}:1: results format version {version!r}; this sparsebench reads versions "
                           f"{', '.join(map(str, READABLE_VERSIONS))}")
    records = []
    measured_at: dict[tuple[str, int], int] = {}  # (cell, round) -> line of its ok record
    for number, line in enumerate(complete[1:], start=2):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ResultsError(f"{path}:{number}: corrupt record ({exc.msg})") from None
        if not isinstance(record, dict) or "cell_id" not in record or "status" not in record:
            raise ResultsError(f"{path}:{number}: corrupt record (no cell_id or status)")
        if not isinstance(record["cell_id"], str) or record["status"] not in STATUSES:
            raise ResultsError(f"{path}:{number}: corrupt record (cell_id {json_type(record['cell_id'])}, status "
                               f"{json_type(record['status'])}; statuses are {', '.join(STATUSES)})")
        try:
            records.append(Record.from_dict(_upgrade(version, record)))
        except RecordTypeError as exc:
            raise ResultsError(f"{path}:{number}: corrupt record ({exc})") from None
        key = (records[-1].cell_id, records[-1].round_number())
        if records[-1].ok:  # (a skipped cell may be re-run: --resume --require-gpu)
            if key in measured_at:
                warnings.append(f"{path}:{number}: cell {key[0]} round {key[1]} was already recorded at line "
                                f"{measured_at[key]}; the later record is used (two runs wrote this file?)")
            measured_at[key] = number
    return Results(path, header, records, warnings)


def flat_view(record: Record) -> dict[str, Any]:
    """The stable JSON_KEYS view of one record (missing metrics are null)."""
    values = record.to_dict()
    merged = {**(record.axes or {}), **values}
    return {key: merged.get(key) for key in JSON_KEYS}
