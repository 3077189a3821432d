"""What the worker is doing now, for the parent's progress view.

The worker rewrites one small file (`{out}/phase`, atomically) at each phase of a cell:
preparing, the quality steps (whose first calls trace the graph), warm-up, the timed
windows, the memory bound. The parent polls it and names the phase in its live view and
its heartbeat, so a minute spent compiling or tracing is no longer silent.
"""

from __future__ import annotations

import os
from pathlib import Path

_target: Path | None = None


def configure(out_dir: Path | None) -> None:
    global _target
    _target = None if out_dir is None else Path(out_dir) / "phase"


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
