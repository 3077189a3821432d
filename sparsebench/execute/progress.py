"""Progress of a run: a live view on a terminal, a heartbeat off one, one line per
finished cell everywhere.

The live view (stderr, rich) shows cells done/total, elapsed time, an ETA and the running
cell with its phase. Result lines go to stdout so they survive in logs. `quiet` keeps only
failures and the final summary.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import TextIO

from ..errors import ConfigError
from ..plan.cell import Cell
from ..record import Record
from ..stats import NOISY_CV, is_noisy


def format_rate(value: float | None) -> str:
    """Samples/s to 3 significant digits with a k/M suffix."""
    if value is None:
        return "-"
    for threshold, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.3g}{suffix}"
    return f"{value:.3g}"


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def describe_record(record: Record) -> str:
    if not record.ok:
        return f"{record.status}: {record.reason or ''}".rstrip(": ")
    if record.profile is not None:
        prof = record.profile
        top = prof["ops"][0] if prof["ops"] else None
        lead = f", top op {top['op_type']} {top['share_pct']:.0f}%" if top else ""
        return f"profiled {prof['steps']} steps, {prof['step_wall_ms']:.1f} ms/step{lead}"
    windows = record.windows or []
    cv = record.cv
    noisy = f"  NOISY (CV {cv:.1%} > {NOISY_CV:.0%})" if is_noisy(cv) else ""
    # The interval the record carries, and the windows' spread named as what it is (a CV,
    # not an interval: "±27%" read like one).
    interval = (f" [{format_rate(record.samples_per_sec_low)}-{format_rate(record.samples_per_sec_high)}]"
                if record.samples_per_sec_low is not None and record.samples_per_sec_high is not None else "")
    spread = f"{interval}, CV {cv:.1%}" if cv is not None else interval
    step = record.step_ms_p50 if record.step_ms_p50 is not None else float("nan")
    return (
        f"{format_rate(record.samples_per_sec)} samples/s{spread} over {len(windows)} windows, "
        f"step p50 {step:.1f} ms, AUC {record.auc or float('nan'):.3f}"
        f"{describe_cluster(record.cluster)}{describe_input(record)}{noisy}"
    )


def describe_input(record: Record) -> str:
    """For a pipeline cell: the pipeline's own rate, the wait share, and the verdict."""
    if record.input_samples_per_sec is None:
        return ""
    verdict = "  INPUT-BOUND" if record.input_bound else ""
    wait = record.input_wait_share if record.input_wait_share is not None else float("nan")
    cpu = (f", {record.input_cpu_us_per_example:.1f} µs CPU/example ({record.input_cpu_share:.0%} of the cores at "
           f"the training rate)" if record.input_cpu_us_per_example is not None and record.input_cpu_share is not None
           else "")
    return (f", input alone {format_rate(record.input_samples_per_sec)}/s, waited "
            f"{wait:.0%} of the windows{cpu}{verdict}")


def describe_cluster(cluster: dict | None) -> str:
    """For a parameter-server cell: each PS task's traffic per step, and lost workers."""
    if not cluster:
        return ""
    parts = []
    for task, traffic in (cluster.get("ps_bytes_per_step") or {}).items():
        parts.append(f"{task} in/out {traffic['received'] / 1e6:.2f}/{traffic['sent'] / 1e6:.2f} MB/step")
    if cluster.get("worker_tasks_lost"):
        parts.append("lost " + ", ".join(cluster["worker_tasks_lost"]) + " (recovered)")
    return ", " + ", ".join(parts) if parts else ""


HEARTBEAT_VARIABLE = "SPARSEBENCH_HEARTBEAT_S"
HEARTBEAT_S = 30.0  # off a terminal: a line this often while a cell runs, so a CI log shows life


def heartbeat_seconds() -> float:
    """`SPARSEBENCH_HEARTBEAT_S` (seconds, finite and > 0) or HEARTBEAT_S. A value that is not
    one is refused (ConfigError), never replaced in silence: a user who set 0 or "ten" would
    otherwise wonder why the CI log still beats every 30 s."""
    text = os.environ.get(HEARTBEAT_VARIABLE)
    if text is None or text.strip() == "":
        return HEARTBEAT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{HEARTBEAT_VARIABLE}={text!r}: expected seconds between heartbeat lines, a finite "
                          f"number > 0 (unset it for the default {HEARTBEAT_S:g} s)")
    return value


def wants_live(stream: TextIO) -> bool:
    """A live view only on a terminal that can redraw (not TERM=dumb); colours follow
    NO_COLOR through rich."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return tty and os.environ.get("TERM", "") not in ("dumb", "unknown")


class Progress:
    """On a terminal: one live view (rich) with a bar, cells done/total, elapsed time, an
    ETA and the running cell with its phase (starting the worker, quality steps, warm-up,
    timing, memory bound). Off a terminal: a heartbeat line on stderr every
    `heartbeat_s` while a cell runs. Everywhere: one line per finished cell on stdout."""

    def __init__(self, total: int, quiet: bool = False, out: TextIO | None = None, err: TextIO | None = None,
                 processes: int = 1, heartbeat_s: float | None = None, clock=time.monotonic):
        self.total = total
        self.processes = processes
        self.quiet = quiet
        self._out = out  # None: sys.stdout at the time of writing (rich's live view redirects it)
        self.err = err or sys.stderr
        self.done = 0
        self.clock = clock
        self.started_at = clock()
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else heartbeat_seconds()
        self.current: Cell | None = None
        self.phase_text = ""
        self.phase_since = self.started_at
        self.last_said = self.started_at
        self.live = (not quiet) and wants_live(self.err)
        self._view = None
        if self.live:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            from rich.table import Column

            fixed = (lambda: Column(no_wrap=True, min_width=7))
            self._view = RichProgress(BarColumn(bar_width=24), MofNCompleteColumn(table_column=fixed()),
                                      TimeElapsedColumn(table_column=fixed()), TextColumn("ETA"),
                                      TimeRemainingColumn(table_column=fixed()),
                                      TextColumn("{task.description}", table_column=Column(ratio=1, no_wrap=True,
                                                                                           overflow="ellipsis")),
                                      console=Console(file=self.err), transient=True, redirect_stdout=False,
                                      redirect_stderr=False)
            self._task = self._view.add_task("", total=max(total, 1))
            self._view.start()

    @property
    def out(self) -> TextIO:
        return self._out or sys.stdout

    def start(self, cell: Cell) -> None:
        self.current = cell
        self.phase(cell, "starting")

    def phase(self, cell: Cell, text: str) -> None:
        """What the running cell's worker does now (polled by the orchestrator)."""
        now = self.clock()
        if text != self.phase_text or cell is not self.current:
            self.current, self.phase_text, self.phase_since = cell, text, now
        if self._view is not None:
            self._view.update(self._task, description=f"{cell.label}: {text} ({now - self.phase_since:.0f} s)")
        elif not self.quiet and now - self.last_said >= self.heartbeat_s:
            self.last_said = now
            print(f"... {self.done}/{self.total} done, {format_duration(now - self.started_at)} elapsed"
                  f"{self._eta(now)}; running {cell.label}: {text} for {now - self.phase_since:.0f} s",
                  file=self.err, flush=True)

    def _eta(self, now: float) -> str:
        if not self.done:
            return ""
        return f", ETA {format_duration((now - self.started_at) / self.done * (self.total - self.done))}"

    def log(self, line: str) -> None:
        """A line for stderr (a worker's log under -v), above the live view."""
        if self._view is not None:
            self._view.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=self.err, flush=True)

    def finish(self, cell: Cell, record: Record) -> None:
        self.done += 1
        self.last_said = self.clock()
        if not self.quiet or not record.done:
            which = f" (process {record.round_number()}/{self.processes})" if self.processes > 1 else ""
            line = f"[{self.done}/{self.total}] {cell.label:<40} {describe_record(record)}{which}"
            if self._view is not None and wants_live(self.out):  # the same terminal: print above the view
                self._view.console.print(line, markup=False, highlight=False, soft_wrap=True)
            else:
                print(line, file=self.out, flush=True)
        if self._view is not None:
            self._view.update(self._task, completed=self.done)

    def close(self) -> None:
        if self._view is not None:
            self._view.stop()
            self._view = None
