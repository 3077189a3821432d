"""`sparsebench run`: a suite's cells -> worker processes -> one results file.

Owns the run's life cycle: expanding the suite (or re-reading it from a results file for
`--resume`), writing the header with the run's metadata and the environment fingerprint,
recording every cell as it finishes, and the final summary and exit code.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .cell import Cell
from .env import fingerprint
from .errors import UserError
from .orchestrator import Orchestrator, Outcome
from .progress import Progress
from .results import ResultsWriter, read_results
from .suite import Suite, load_suite, parse_suite, shipped_suites


@dataclass
class RunSummary:
    path: Path
    counts: Counter = field(default_factory=Counter)
    planned: int = 0
    already_done: int = 0

    @property
    def exit_code(self) -> int:
        return 1 if self.counts["failed"] or self.counts["timeout"] else 0

    def line(self) -> str:
        parts = [f"{self.counts[s]} {s}" for s in ("ok", "skipped", "failed", "timeout") if self.counts[s]]
        resumed = f" ({self.already_done} already done)" if self.already_done else ""
        return f"{self.planned} cells run{resumed}: {', '.join(parts) or 'nothing'}; results in {self.path}"


def git_revision() -> dict[str, Any] | None:
    """The project's git revision, where sparsebench runs from a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10)
        return {"commit": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def suite_text(name_or_path: str) -> str:
    """The suite's TOML, stored in the results header so --resume needs no suite file."""
    shipped = shipped_suites()
    if name_or_path in shipped:
        return shipped[name_or_path].read_text()
    return Path(name_or_path).read_text()


def prepare(suite_arg: str, overrides: list[str]) -> tuple[Suite, list[Cell], str]:
    suite = load_suite(suite_arg)
    for assignment in overrides:
        suite.override(assignment)
    return suite, suite.cells(), suite_text(suite_arg)


def default_output(suite: Suite) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("results") / f"{suite.name}-{stamp}.jsonl"


def run_header(suite: Suite, suite_arg: str, overrides: list[str], text: str, isolation: str, cells: int,
               **extra: Any) -> dict[str, Any]:
    """The `run` part of a results file's header."""
    return {
        "suite": suite.name,
        "suite_arg": suite_arg,
        "suite_source": suite.source,
        "suite_text": text,
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


def run(
    suite_arg: str | None,
    overrides: list[str],
    output: Path | None = None,
    resume: Path | None = None,
    quiet: bool = False,
    require_gpu: bool = False,
    isolation: str | None = None,
) -> RunSummary:
    if resume is not None:
        previous = read_results(resume)
        run_meta = previous.header.get("run", {})
        if suite_arg is not None and suite_arg not in (run_meta.get("suite"), run_meta.get("suite_arg")):
            raise UserError(f"--resume {resume}: that file holds suite {run_meta.get('suite')!r}, not {suite_arg!r}")
        suite = parse_suite(run_meta["suite_text"], run_meta.get("suite_source", str(resume)), run_meta["suite"])
        for assignment in run_meta.get("overrides", []):
            suite.override(assignment)
        cells = suite.cells()
        done = previous.done_ids()
        todo = [c for c in cells if c.cell_id not in done]
        path = Path(resume)
        writer = ResultsWriter(path)
        already = len(cells) - len(todo)
    else:
        if suite_arg is None:
            raise UserError("run: give --suite NAME|PATH (or --resume RESULTS)")
        suite, cells, text = prepare(suite_arg, overrides)
        todo = cells
        path = Path(output) if output is not None else default_output(suite)
        run_meta = run_header(suite, suite_arg, overrides, text, isolation or suite.isolation, len(cells))
        writer = ResultsWriter(path, lambda: {"run": run_meta, "environment": fingerprint()})
        already = 0

    summary = RunSummary(path=path, planned=len(todo), already_done=already)
    progress = Progress(len(todo), quiet=quiet)

    def record(outcome: Outcome) -> None:
        rec = outcome.record
        if require_gpu and rec.get("status") == "skipped" and rec.get("reason") == "no GPU":
            rec = {**rec, "status": "failed", "reason": "no GPU (--require-gpu)"}
        writer.append(rec)
        summary.counts[rec["status"]] += 1
        progress.finish(outcome.cell, rec)

    orchestrator = Orchestrator(record, isolation=isolation or run_meta.get("isolation", suite.isolation), on_start=progress.start)
    try:
        orchestrator.run(todo)
    finally:
        progress.close()
        writer.close()
    return summary


def profile(suite_arg: str, overrides: list[str], steps: int, output: Path | None, quiet: bool = False,
            isolation: str | None = None) -> tuple[Path, list[tuple[Cell, dict[str, Any]]], RunSummary]:
    """Profile every cell of a suite; per cell the worker writes DIR/<cell_id>/{plugins,ops.*,trace.json}.

    The records (with each cell's op table) also go to DIR/results.jsonl, so `report`
    can show them later.
    """
    if steps < 1:
        raise UserError(f"--steps: must be >= 1, got {steps}")
    suite, cells, text = prepare(suite_arg, overrides)
    folder = Path(output) if output is not None else Path("results") / f"profile-{suite.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = folder / "results.jsonl"
    run_meta = run_header(suite, suite_arg, overrides, text, isolation or suite.isolation, len(cells), profile_steps=steps)
    writer = ResultsWriter(path, lambda: {"run": run_meta, "environment": fingerprint()})
    summary = RunSummary(path=path, planned=len(cells))
    progress = Progress(len(cells), quiet=quiet)
    profiled: list[tuple[Cell, dict[str, Any]]] = []

    def record(outcome: Outcome) -> None:
        writer.append(outcome.record)
        summary.counts[outcome.record["status"]] += 1
        profiled.append((outcome.cell, outcome.record))
        progress.finish(outcome.cell, outcome.record)

    orchestrator = Orchestrator(record, isolation=run_meta["isolation"], on_start=progress.start,
                                job_extra={"profile": {"steps": steps, "dir": str(folder.resolve())}})
    try:
        orchestrator.run(cells)
    finally:
        progress.close()
        writer.close()
    return folder, profiled, summary
