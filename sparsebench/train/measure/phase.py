"""What the worker is doing now, for the parent's progress view.

The worker rewrites one small file (`{out}/phase`, atomically) at each phase of a cell:
preparing, the quality steps (whose first calls trace the graph), warm-up, the timed
windows, the memory bound. The parent polls it and names the phase in its live view and
its heartbeat, so a minute spent compiling or tracing is no longer silent.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_target: Path | None = None
_turn: Path | None = None  # {out}/{index}: this cell waits for its turn before timing (sparsebench ab)


def configure(out_dir: Path | None) -> None:
    global _target
    _target = None if out_dir is None else Path(out_dir) / "phase"


def begin_cell(out_dir: Path, index: int, lockstep: bool) -> None:
    """A new cell of the job: in lockstep (`ab`), its timing waits for the parent."""
    global _turn
    _turn = Path(out_dir) / str(index) if lockstep else None


def wait_turn() -> None:
    """Between a cell's preparation (data, model, the first trace) and its timing (warm-up,
    windows, memory bound): in lockstep, say `{i}.prepared` and wait for `{i}.time`, so
    that the other side of an A/B run can prepare while this one prepares, but nothing of
    it runs while this one is timed. Outside lockstep, nothing."""
    if _turn is None:
        return
    prepared, go = _turn.with_suffix(".prepared"), _turn.with_suffix(".time")
    prepared.write_text(str(time.time()))
    announce("waiting for its turn to be timed")
    while not go.exists():
        time.sleep(0.002)


def announce(text: str) -> None:
    """Say what the worker does from now on (a no-op outside a worker with an out folder)."""
    if _target is None:
        return
    temporary = _target.with_suffix(".tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, _target)
    except OSError:
        pass  # progress is a courtesy: never fail a cell over it
