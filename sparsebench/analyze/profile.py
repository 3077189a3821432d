"""Op tables of profiled cells, as text: per cell, and the same ops side by side.

The worker writes each profiled cell's summary (`ops.json`, also stored in the record
under `profile`; see `sparsebench.train.measure.profiler`); this module only reads and prints
them, so the CLI can show a profile without importing TensorFlow.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any


def by_op_type(summary: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for op in summary["ops"]:
        out[op["op_type"]] += op["ms_per_step"]
    return dict(out)


def format_cell(summary: dict[str, Any], label: str, top: int = 10) -> str:
    lines = [f"{label}: step {summary['step_wall_ms']:.1f} ms wall, {summary['op_ms_per_step']:.1f} ms of op time "
             f"over {summary['steps']} profiled steps"]
    phases = ", ".join(f"{p} {ms:.1f} ms" for p, ms in summary["phases_ms_per_step"].items())
    lines.append(f"  by phase: {phases}")
    if summary.get("note"):
        lines.append(f"  note: {summary['note']}")
    if summary.get("hosts_ms_per_step"):
        hosts = ", ".join(f"{host} {ms:.1f} ms" for host, ms in summary["hosts_ms_per_step"].items())
        lines.append(f"  op time per step by task: {hosts}")
    lines.append(f"  {'op':<34} {'phase':<10} {'ms/step':>8} {'share':>7} {'calls/step':>10}")
    for op in summary["ops"][:top]:
        lines.append(f"  {op['op_type']:<34} {op['phase']:<10} {op['ms_per_step']:>8.2f} "
                     f"{op['share_pct']:>6.1f}% {op['calls_per_step']:>10.1f}")
    return "\n".join(lines)


def format_side_by_side(summaries: list[tuple[str, dict[str, Any]]], top: int = 15) -> str:
    """The same op types across cells (ms per step), with the step-time difference."""
    tables = [(label, by_op_type(s)) for label, s in summaries]
    totals: dict[str, float] = defaultdict(float)
    for _, table in tables:
        for op, ms in table.items():
            totals[op] = max(totals[op], ms)
    ops = sorted(totals, key=totals.get, reverse=True)[:top]
    width = max(12, *(len(label) for label, _ in tables))
    lines = [f"{'op (ms per step)':<34} " + " ".join(f"{label:>{width}}" for label, _ in tables)]
    for op in ops:
        lines.append(f"{op:<34} " + " ".join(
            f"{table[op]:>{width}.2f}" if op in table else f"{'-':>{width}}" for _, table in tables))
    walls = [s["step_wall_ms"] for _, s in summaries]
    lines.append(f"{'step wall time':<34} " + " ".join(f"{w:>{width}.1f}" for w in walls))
    base = walls[0]
    lines.append(f"{'vs first cell':<34} " + " ".join(f"{(w - base) / base * 100:>+{width - 1}.1f}%" for w in walls))
    return "\n".join(lines)
