"""The fused custom op, built before any cell needs it.

Compiling takes tens of seconds; inside a worker it would land in a cell's timing or its
timeout. So the parent builds it first, in a process of its own (the parent never imports
TensorFlow): `python -m sparsebench.train.custom_ops build --json`. Workers then load the
cached library. Where it cannot be built (no compiler, no TensorFlow headers, a compile
error), the cells that need it are recorded as `skipped: custom op unavailable: ...`
without starting a worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from ..modules import module_command
from ..lifetime import die_with_parent
from ..plan.cell import Cell
from ..plan.spec import CUSTOM_OP_VARIANTS

BUILD_TIMEOUT_S = 900.0


def needs_custom_op(cell: Cell) -> bool:
    """The cell runs an op of the library: the fused layer, or the C++ text parser."""
    return cell.model.variant in CUSTOM_OP_VARIANTS or cell.data.parses_text_with_op


def custom_op(action: str = "build", python: str = sys.executable, force: bool = False,
              tensorflow_facts: bool = False) -> dict[str, Any]:
    """`build` or `status` of the op, as the TensorFlow side reports it (`force`: compile
    again whatever is cached; `tensorflow_facts`: the answer also holds TensorFlow's facts
    under "tensorflow", so the fingerprint need not start TensorFlow a second time)."""
    command = (module_command(python, "sparsebench.train.worker", "--build-op") if tensorflow_facts and action == "build"
               and not force else module_command(python, "sparsebench.train.custom_ops", action, "--json",
                                                 *(["--force"] if force else [])))
    try:
        done = subprocess.run(command, capture_output=True,
                              text=True, timeout=BUILD_TIMEOUT_S, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
                              preexec_fn=die_with_parent)
    except subprocess.TimeoutExpired:
        return {"ok": False, "reason": f"building the custom op took over {BUILD_TIMEOUT_S:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"ok": False, "reason": f"the op builder failed: {last[:200]}"}
    return json.loads(lines[-1])


def prebuild(cells: list[Cell], python: str = sys.executable,
             say=lambda line: print(line, file=sys.stderr, flush=True)) -> dict[str, Any] | None:
    """Build the op (for `python`'s TensorFlow) before any cell runs: the cells of its
    variant run it, and every local cell measures its memory bound with the op library's
    replay after its windows. None when no cell is local (nothing needs it)."""
    if not any(needs_custom_op(c) or c.distribution.is_local for c in cells):
        return None
    say("custom op: building the fused op library, or loading it from the cache (a first build runs the "
        "compiler; its time is printed when it ends)")
    info = custom_op("build", python, tensorflow_facts=True)
    if info.get("ok"):
        how = "cached" if info.get("cached") else f"compiled in {info.get('compile_seconds') or 0:.0f} s"
        say(f"custom op: {how}: {info['library']}")
    else:
        log = f" (compiler log: {info['log']})" if info.get("log") else ""
        users = "its cells are skipped and " if any(needs_custom_op(c) for c in cells) else ""
        say(f"custom op unavailable: {info.get('reason')}{log}; {users}no cell measures its memory bound")
    return info


def tensorflow_facts(info: dict[str, Any] | None) -> dict[str, Any] | None:
    """TensorFlow's facts from a build's answer, taken out of it (they belong in the
    fingerprint, not beside the op's build), or None."""
    return info.pop("tensorflow", None) if isinstance(info, dict) else None


def skip_reason(info: dict[str, Any] | None) -> str | None:
    """The `skipped` reason of the op's cells, or None when they can run."""
    if info is None or info.get("ok"):
        return None
    return f"custom op unavailable: {info.get('reason')}"
