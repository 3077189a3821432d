"""Progress of a run: a live bar on a terminal, one line per finished cell everywhere.

The bar (stderr, redrawn in place) shows the cell running, cells done/total and an ETA
from the mean time per finished cell. Result lines go to stdout so they survive in logs.
`quiet` keeps only failures and the final summary, for CI logs.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

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


class Progress:
    def __init__(self, total: int, quiet: bool = False, out: TextIO | None = None, err: TextIO | None = None,
                 processes: int = 1):
        self.total = total
        self.processes = processes
        self.quiet = quiet
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.done = 0
        self.started_at = time.monotonic()
        self.live = (not quiet) and self.err.isatty()
        self.current: Cell | None = None

    def start(self, cell: Cell) -> None:
        self.current = cell
        self._draw()

    def _draw(self) -> None:
        if not self.live or self.current is None:
            return
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        elapsed = time.monotonic() - self.started_at
        eta = f"ETA {format_duration(elapsed / self.done * (self.total - self.done))}" if self.done else "ETA --:--"
        line = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {eta}  running {self.current.label}"
        self.err.write("\r\033[K" + line[:160])
        self.err.flush()

    def finish(self, cell: Cell, record: Record) -> None:
        self.done += 1
        if self.live:
            self.err.write("\r\033[K")
        if not self.quiet or not record.done:
            which = f" (process {record.round_number()}/{self.processes})" if self.processes > 1 else ""
            print(f"[{self.done}/{self.total}] {cell.label:<40} {describe_record(record)}{which}", file=self.out,
                  flush=True)
        self._draw()

    def close(self) -> None:
        if self.live:
            self.err.write("\r\033[K")
            self.err.flush()
