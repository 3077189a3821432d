"""`sparsebench report`: results files -> tables. Computes nothing new: it reads."""

from __future__ import annotations

import json
from pathlib import Path

from .progress import format_rate
from .results import flat_view, read_results


def load_rows(paths: list[Path]) -> tuple[list[dict], list[str]]:
    rows, warnings = [], []
    for path in paths:
        results = read_results(path)
        warnings += results.warnings
        for record in results.latest():
            rows.append(flat_view(record))
    return rows, warnings


def render(paths: list[Path], fmt: str) -> str:
    rows, warnings = load_rows(list(paths))
    if fmt == "json":
        return json.dumps(rows, indent=2)
    lines = [f"warning: {w}" for w in warnings]
    header = f"{'cell':<48} {'status':<8} {'samples/s':>10} {'95% interval':>17} {'CV':>6} {'AUC':>6}"
    lines += [header, "-" * len(header)]
    for row in rows:
        interval = (
            f"{format_rate(row['samples_per_sec_low'])}-{format_rate(row['samples_per_sec_high'])}"
            if row["status"] == "ok" else ""
        )
        cv = f"{row['cv']:.1%}" if row.get("cv") is not None else ""
        auc = f"{row['auc']:.3f}" if row.get("auc") is not None else ""
        rate = format_rate(row["samples_per_sec"]) if row["status"] == "ok" else (row.get("reason") or "")[:30]
        lines.append(f"{row['cell_id']:<48} {row['status']:<8} {rate:>10} {interval:>17} {cv:>6} {auc:>6}")
    return "\n".join(lines)
