"""`sparsebench report`: results files -> views -> text, markdown, CSV, JSON or HTML.

Compute first, render after: each view is a function from the records' DataFrame to a
`View` (a DataFrame of display values plus notes); renderers only format. Reading is all
this module does: it never re-runs anything.

Views:
- `talk`: batch size x {device} x {baseline, optimized}, with speedup columns; cells
  without a measurement show their status (`skipped: no GPU`), never a blank or a zero.
- `matrix`: every cell with median, 95% interval, CV, loss, AUC, peak memory, grad type.
- `pivot`: any two axes against each other, for any metric.
- `best`: per batch size and device, the fastest configuration and its margin over the next.
- `traffic`: parameter-server cells: each PS task's bytes per step, bytes per example, and
  how many times fewer bytes than the best stock layout of the same cluster shape.
- `projection`: samples/s of larger PS clusters on a given network, forecast from a profiled
  PS cell's per-task CPU and bytes per step, with its bottleneck (projection.py).
"""

from __future__ import annotations

import json
import statistics
import math
import numbers
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import UserError
from ..load import busy_warning
from ..machine import field_at
from ..plan.spec import BASELINE_VARIANT
from ..record import Record
from ..results import JSON_KEYS, flat_view, read_results
from .. import stats
from ..stats import NOISY_CV, is_noisy
from ..tables import looks_numeric, markdown_text, render_table, sig3

VIEWS = ("talk", "matrix", "pivot", "best", "ops", "traffic", "projection")
FORMATS = ("table", "markdown", "csv", "json", "html")
AXIS_COLUMNS = (
    "variant", "shards", "partition_strategy", "batch_size", "optimizer", "device", "intra_op_threads",
    "inter_op_threads", "omp_num_threads", "mkl_num_threads", "kmp_blocktime", "onednn", "workers",
    "learning_rate", "out_dim", "discretizer", "normalization", "strategy", "ps_tasks", "worker_tasks",
    "input", "data_format",
)
VARIANT_AXES = ("variant", "shards", "partition_strategy")  # how sp @ W is computed
NOISY_MARK = "*"
TIE_MARK = "≈"  # the fastest pick, with a runner-up inside its interval


@dataclass
class View:
    title: str
    table: pd.DataFrame  # display strings
    notes: list[str] = field(default_factory=list)
    numeric: pd.DataFrame | None = None  # the numbers behind the strings (csv)


@dataclass
class Loaded:
    frame: pd.DataFrame  # one row per cell per run
    runs: list[dict[str, Any]]  # per file: path, label, header
    warnings: list[str]


# -- loading ---------------------------------------------------------------------------
def run_label(path: Path) -> str:
    """A run's name in combined views: its results file's name."""
    return path.stem


def load(paths: list[Path]) -> Loaded:
    rows, runs, warnings = [], [], []
    for path in paths:
        results = read_results(path)
        warnings += results.warnings
        label = run_label(Path(path))
        machine = field_at(results.environment, "cpu", "model") or "unknown CPU"
        runs.append({"path": str(path), "label": label, "header": results.header, "machine": machine})
        merged = results.latest()
        busy = busy_warning(merged, str(path))
        if busy:
            warnings.append(busy)
        labels = Counter(_label(record) for record in merged)
        for record in merged:
            row = flat_view(record)
            row["run"] = label
            row["machine"] = machine
            # Cells that differ only where the label does not look (two files of one format)
            # keep their ids' hash, or the table would show the same name twice.
            row["label"] = _label(record) if labels[_label(record)] == 1 else record.cell_id
            row["profile"] = record.profile  # op table, for records written by `profile`
            row["process_windows"] = record.process_windows or ([record.windows] if record.windows else None)
            row["not_finite"] = [name for name in QUALITY_METRICS if record.not_finite(name)]
            row["quality_steps"] = record.quality_steps
            row["cluster"] = record.cluster
            rows.append(row)
    frame = pd.DataFrame(rows, columns=[*JSON_KEYS, "run", "machine", "label", "profile", "process_windows",
                                        "not_finite", "quality_steps", "cluster"])
    return Loaded(frame, runs, warnings)


def _label(record: Record) -> str:
    cell_id = record.cell_id or ""
    return cell_id.rsplit("-", 1)[0] if record.axes else cell_id


def _as_text(value: Any) -> str:
    """How a condition sees a value: whole numbers without ".0" (a column with missing
    values holds its integers as floats), missing ones as "n/a"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def filter_rows(loaded: Loaded, conditions: list[str]) -> Loaded:
    """Keep the cells matching every `AXIS=V1,V2` condition (values compared as text)."""
    frame = loaded.frame
    for condition in conditions:
        axis, sep, raw = condition.partition("=")
        axis = axis.strip()
        if not sep or axis not in frame.columns or axis in ("windows", "profile"):
            raise UserError(f"--where {condition}: expected AXIS=VALUE with AXIS one of {', '.join(AXIS_COLUMNS)}")
        wanted = {v.strip().lower() for v in raw.split(",")}
        frame = frame[frame[axis].map(lambda v: _as_text(v).lower() in wanted)]
    if frame.empty:
        raise UserError(f"--where {' '.join(conditions)}: no cell matches")
    return Loaded(frame, loaded.runs, loaded.warnings)


# -- formatting helpers ----------------------------------------------------------------
def ratio(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{float(value):.2f}x"


def status_text(row: pd.Series) -> str:
    reason = row.get("reason")
    return f"{row['status']}: {reason}" if isinstance(reason, str) and reason else str(row["status"])


def rate_cell(row: pd.Series) -> str:
    """A throughput for display: the rounded median (marked if noisy) or the status."""
    if row["status"] != "ok":
        return status_text(row)
    mark = NOISY_MARK if _noisy(row) else ""
    return sig3(row["samples_per_sec"]) + mark


def rate_with_interval(row: pd.Series) -> str:
    """A throughput with its 95% interval: 21,000 [20,500-21,500] (marks as rate_cell)."""
    text = rate_cell(row)
    if row["status"] != "ok" or pd.isna(row.get("samples_per_sec_low")) or pd.isna(row.get("samples_per_sec_high")):
        return text
    mark = f" {ONE_PROCESS_MARK}" if one_process(row) else ""
    return f"{text} [{sig3(row['samples_per_sec_low'])}-{sig3(row['samples_per_sec_high'])}]{mark}"


def ratio_of(top: pd.Series | None, bottom: pd.Series | None) -> tuple[float | None, float | None, float | None]:
    """top / bottom samples/s with the 95% interval of the ratio (both cells resampled:
    processes, then windows); Nones where either is missing."""
    if top is None or bottom is None or not bottom["samples_per_sec"]:
        return None, None, None
    value = float(top["samples_per_sec"]) / float(bottom["samples_per_sec"])
    windows_top, windows_bottom = top.get("process_windows"), bottom.get("process_windows")
    if not windows_top or not windows_bottom:
        return value, None, None
    low, high = stats.ratio_interval(windows_bottom, windows_top)
    return value, low, high


def ratio_text(value: float | None, low: float | None, high: float | None) -> str:
    if not value:
        return "n/a"
    return ratio(value) + (f" [{low:.2f}-{high:.2f}]" if low is not None and high is not None else "")


def _noisy(row: pd.Series) -> bool:
    return is_noisy(row.get("cv"))


def _noisy_note(frame: pd.DataFrame) -> list[str]:
    if frame.apply(_noisy, axis=1).any() if len(frame) else False:
        return [f"{NOISY_MARK} noisy: the windows' coefficient of variation is above {NOISY_CV:.0%}"]
    return []


ONE_PROCESS_MARK = "†"
ONE_PROCESS_NOTE = (f"{ONE_PROCESS_MARK} measured in one process: the interval comes from that process's windows "
                    f"and says nothing of run-to-run noise, which is often larger (measure with --processes N)")


def one_process(row: pd.Series) -> bool:
    """An ok cell whose interval does not include run-to-run noise."""
    return row["status"] == "ok" and not bool(row.get("run_to_run_measured"))


def interval_text(row: pd.Series) -> str:
    mark = f" {ONE_PROCESS_MARK}" if one_process(row) else ""
    return f"{sig3(row['samples_per_sec_low'])} - {sig3(row['samples_per_sec_high'])}{mark}"


def _one_process_note(frame: pd.DataFrame) -> list[str]:
    return [ONE_PROCESS_NOTE] if len(frame) and frame.apply(one_process, axis=1).any() else []


def _spread_text(row: pd.Series) -> str:
    """CV of one process's windows, or within / between processes."""
    if row.get("between_process_cv") is not None and not pd.isna(row.get("between_process_cv")):
        return f"{row['within_process_cv'] or 0:.1%} / {row['between_process_cv']:.1%}"
    return f"{row['cv']:.1%}" if row["cv"] is not None and not pd.isna(row["cv"]) else ""


def _multi_run(frame: pd.DataFrame) -> bool:
    return frame["run"].nunique() > 1


# -- views -----------------------------------------------------------------------------
def view_matrix(frame: pd.DataFrame) -> View:
    rows = []
    has_pipeline = frame["input_samples_per_sec"].notna().any()
    has_cpu = frame["cpu_samples_per_sec"].notna().any()  # records from before CPU time have none
    has_bound = frame["bound_samples_per_sec"].notna().any()  # nor from before the memory bound
    for _, row in frame.iterrows():
        ok = row["status"] == "ok"
        rows.append({
            **({"run": row["run"]} if _multi_run(frame) else {}),
            "cell": row["label"],
            "status": status_text(row),
            "samples/s": rate_cell(row) if ok else "",
            "95% interval": interval_text(row) if ok else "",
            "processes": str(int(row["processes"])) if ok and not pd.isna(row["processes"]) else "",
            "CV (within / between)": _spread_text(row) if ok else "",
            **({"samples/CPU-s": sig3(row["cpu_samples_per_sec"]) if ok else "",
                "cores busy": f"{row['cpu_busy_cores']:.2f}" if ok and not pd.isna(row["cpu_busy_cores"]) else ""}
               if has_cpu else {}),
            **({"memory bound": sig3(row["bound_samples_per_sec"]) if ok else "",
                "% of bound": _share_text(row["bound_share"]) if ok else ""} if has_bound else {}),
            "loss": _quality_text(row, "loss", "{:.4f}") if ok else "",
            "AUC": _quality_text(row, "auc", "{:.3f}") if ok else "",
            "peak RSS (MB)": f"{row['peak_rss_mb']:.0f}" if ok and row["peak_rss_mb"] is not None else "",
            "grad": row["grad_type"] if ok and isinstance(row["grad_type"], str) else "",
            **({"input": _input_text(row) if ok else ""} if has_pipeline else {}),
        })
    notes = _noisy_note(frame) + _one_process_note(frame) + quality_steps_note(frame)
    if has_bound:
        notes.append("memory bound: samples/s at which the cell's layer memory traffic alone runs (its own batches "
                     "replayed with its threads: each entry's row read, each distinct key's rows read and written as "
                     "its optimizer does); % of bound: samples/s as a share of it")
    if has_pipeline:
        notes.append("input: for pipeline cells, the pipeline's own samples/s, the share of the cores it needs at the "
                     "training rate, and whether training waited for it (input-bound: waited >= 20% of the windows, "
                     "or the pipeline alone < 1.2x the training rate, or it needs >= 50% of the cores)")
    return View("All cells", pd.DataFrame(rows), notes, frame)


QUALITY_METRICS = ("loss", "eval_loss", "auc")


def quality_steps_note(frame: pd.DataFrame) -> list[str]:
    """A note where the ok cells' quality figures rest on different step counts (runs with
    other quality_steps, or records from before the quality phase, measured after the
    timed windows): those figures do not compare."""
    ok = frame[frame["status"] == "ok"]
    if ok.empty:
        return []
    counts = {("after the timed windows (a record from before quality_steps)" if pd.isna(v) else f"{int(v)} steps")
              for v in ok["quality_steps"]}
    if len(counts) < 2:
        return []
    return [f"loss and AUC rest on different training: {', '.join(sorted(counts))}; compare them only between cells "
            f"trained alike"]


def _share_text(share: Any) -> str:
    return "" if share is None or pd.isna(share) else f"{100 * share:.0f}%"


def _quality_text(row, name: str, form: str) -> str:
    """A quality figure; "NaN" where it was measured as NaN or infinite (the file holds null)."""
    if name in (row.get("not_finite") or []):
        return "NaN"
    value = row[name]
    return form.format(value) if value is not None and not pd.isna(value) else ""


def _input_text(row) -> str:
    alone = row.get("input_samples_per_sec")
    if alone is None or pd.isna(alone):
        return ""
    share = row.get("input_cpu_share")
    cpu = f", CPU {share:.0%}" if share is not None and not pd.isna(share) else ""
    return f"{'input-bound' if row.get('input_bound') else 'not input-bound'} (alone {sig3(alone)}{cpu})"


def view_talk(frame: pd.DataFrame) -> View:
    """The talk's table: rows batch sizes, columns device x {baseline, optimized} + speedups."""
    if frame.empty:
        raise UserError("report --view talk: no cells in the results")
    if BASELINE_VARIANT not in set(frame["variant"]):
        raise UserError(f"report --view talk: needs {BASELINE_VARIANT} cells (the baseline); use --view matrix")
    devices = [d for d in ("cpu", "gpu") if d in set(frame["device"])]
    notes, out_rows, numeric_rows = [], [], []
    optimized_variants: set[str] = set()
    ties: list[str] = []
    multi = _multi_run(frame)
    # Baseline and optimized are compared only between cells that agree on everything but
    # the variant: any other axis that varies (optimizer, threads, ...) gets its own rows.
    split_by = [a for a in AXIS_COLUMNS if a not in (*VARIANT_AXES, "batch_size", "device")
                and frame[a].astype(str).nunique() > 1]
    keys = [(run, settings, batch)
            for run in dict.fromkeys(frame["run"])
            for settings in dict.fromkeys(tuple(r) for r in frame[frame["run"] == run][split_by].itertuples(index=False))
            for batch in sorted(frame[frame["run"] == run]["batch_size"].unique())]
    all_frame = frame
    for run, settings, batch in keys:
        frame = all_frame[all_frame["run"] == run]
        for axis, value in zip(split_by, settings):
            frame = frame[frame[axis].astype(str) == str(value)]
        if frame.empty or batch not in set(frame["batch_size"]):
            continue
        row: dict[str, Any] = {"run": run, "machine": frame["machine"].iloc[0]} if multi else {}
        nums: dict[str, Any] = {"run": run} if multi else {}
        row.update({axis: value for axis, value in zip(split_by, settings)})
        nums.update({axis: value for axis, value in zip(split_by, settings)})
        row["batch size"] = int(batch)
        nums["batch_size"] = int(batch)
        picked_rows: dict[str, tuple[pd.Series | None, pd.Series | None]] = {}
        for device in devices:
            cells = frame[(frame["batch_size"] == batch) & (frame["device"] == device)]
            base = cells[cells["variant"] == BASELINE_VARIANT]
            others = cells[cells["variant"] != BASELINE_VARIANT]
            d = device.upper()
            row[f"{d} baseline"], base_row = _pick(base)
            row[f"{d} optimized"], best_row = _pick(others)
            picked_rows[device] = (base_row, best_row)
            ok_others = others[others["status"] == "ok"].sort_values("samples_per_sec", ascending=False)
            if len(ok_others):
                winner = ok_others.iloc[0]
                optimized_variants.add(winner["label"])
                tied = [r for _, r in ok_others.iloc[1:].iterrows()
                        if r["samples_per_sec"] >= winner["samples_per_sec_low"]]
                if tied:
                    row[f"{d} optimized"] += TIE_MARK
                    ties.append(f"{TIE_MARK} batch {int(batch)} {d}: {winner['label']} is the fastest, but "
                                f"{', '.join(r['label'] + ' (' + sig3(r['samples_per_sec']) + ')' for r in tied)} "
                                f"lies within its interval ({interval_text(winner)}): a tie, not a finding")
            for kind, picked in (("baseline", base_row), ("optimized", best_row)):
                nums[f"{device}_{kind}"] = None if picked is None else float(picked["samples_per_sec"])
                nums[f"{device}_{kind}_low"] = None if picked is None else picked["samples_per_sec_low"]
                nums[f"{device}_{kind}_high"] = None if picked is None else picked["samples_per_sec_high"]
            speedup = ratio_of(best_row, base_row)
            row[f"{d} speedup"] = ratio_text(*speedup)
            nums[f"{device}_speedup"], nums[f"{device}_speedup_low"], nums[f"{device}_speedup_high"] = speedup
        if "cpu" in devices and "gpu" in devices:
            for i, kind in enumerate(("baseline", "optimized")):
                value = ratio_of(picked_rows["gpu"][i], picked_rows["cpu"][i])
                row[f"GPU/CPU {kind}"] = ratio_text(*value)
                nums[f"gpu_over_cpu_{kind}"], nums[f"gpu_over_cpu_{kind}_low"], nums[f"gpu_over_cpu_{kind}_high"] = value
        out_rows.append(row)
        numeric_rows.append(nums)
    notes.append(f"baseline: {BASELINE_VARIANT}; optimized: the fastest other variant measured at that batch size and device")
    if optimized_variants:
        notes.append("optimized cells: " + ", ".join(sorted(optimized_variants)))
    notes += ties + _noisy_note(all_frame) + _one_process_note(all_frame[all_frame["status"] == "ok"])
    return View("Training throughput, samples/s (the talk's table)", pd.DataFrame(out_rows), notes, pd.DataFrame(numeric_rows))


def _pick(cells: pd.DataFrame) -> tuple[str, pd.Series | None]:
    """The fastest ok cell's display value (with its interval) and row, or the status of
    the first cell and None."""
    if cells.empty:
        return "not measured", None
    ok = cells[cells["status"] == "ok"]
    if ok.empty:
        return status_text(cells.iloc[0]), None
    best = ok.loc[ok["samples_per_sec"].idxmax()]
    return rate_with_interval(best), best


def _labelled(values: pd.Series) -> pd.Categorical:
    """An axis some cells do not have (ps_tasks of a local cell): its values in order, as
    text (whole numbers without ".0", as `--where` sees them), then "n/a" for the cells without it."""
    labels = [_as_text(v) for v in sorted(values.dropna().unique())] + ["n/a"]
    return pd.Categorical(values.map(_as_text), categories=labels, ordered=True)


def view_pivot(frame: pd.DataFrame, rows: str, cols: str, metric: str) -> View:
    for name, value in (("--rows", rows), ("--cols", cols)):
        if value not in frame.columns or value in ("windows",):
            raise UserError(f"report {name} {value}: not a column; axes: {', '.join(AXIS_COLUMNS)}")
    if metric not in frame.columns:
        raise UserError(f"report --metric {metric}: not a column; metrics: samples_per_sec, cv, step_ms_p50, auc, loss, ...")
    ok = frame[frame["status"] == "ok"]
    if ok.empty:
        raise UserError("report --view pivot: no ok cells to pivot")
    partial = sorted(axis for axis in {rows, cols} if ok[axis].isna().any())
    ok = ok.assign(**{axis: _labelled(ok[axis]) for axis in partial})
    index = ["run", rows] if _multi_run(ok) else [rows]
    # Each entry is the cell with the largest metric (where several cells share it), with
    # that cell's own interval when the metric is the throughput.
    chosen = ok.sort_values(metric, ascending=False, na_position="last").drop_duplicates([*index, cols])
    table = chosen.pivot_table(index=index, columns=cols, values=metric, aggfunc="first", observed=True)
    counts = ok.groupby([*index, cols], observed=True).size()
    counts = counts[counts > 0]
    notes = [f"{metric}; rows {rows}, columns {cols}"]
    notes += [f"{axis} n/a: cells without that axis (a local cell has no ps_tasks)" for axis in partial]
    if (counts > 1).any():
        notes.append(f"several cells share some entries (other axes differ); each entry shows the largest {metric}")
    if metric in QUALITY_METRICS:
        notes += quality_steps_note(ok)
    fmt = sig3 if metric.startswith("samples_per_sec") else (lambda v: "" if pd.isna(v) else f"{v:.4g}")
    display = table.map(lambda v: "" if pd.isna(v) else fmt(v))
    numeric = table.reset_index()
    if metric == "samples_per_sec":
        bounds = {side: chosen.pivot_table(index=index, columns=cols, values=f"samples_per_sec_{side}",
                                           aggfunc="first", observed=True).reindex_like(table)
                  for side in ("low", "high")}
        display = display.astype(object)
        for r in table.index:
            for c in table.columns:
                low, high = bounds["low"].loc[r, c], bounds["high"].loc[r, c]
                if display.loc[r, c] and pd.notna(low) and pd.notna(high):
                    display.loc[r, c] = f"{display.loc[r, c]} [{sig3(low)}-{sig3(high)}]"
        notes.append("each entry: samples/s [its 95% interval]")
        flat = [bounds[side].reset_index().rename(columns=lambda c: c if c in index else f"{c}_{side}")
                for side in ("low", "high")]
        numeric.columns = [str(c) for c in numeric.columns]
        for part in flat:
            part.columns = [str(c) for c in part.columns]
            numeric = numeric.merge(part, on=[str(i) for i in index])
    display = display.reset_index()
    display.columns = [str(c) for c in display.columns]
    return View(f"{metric} by {rows} x {cols}", display, notes, numeric)


def view_best(frame: pd.DataFrame) -> View:
    rows, numeric = [], []
    multi = _multi_run(frame)
    for (run, batch, device), cells in frame.groupby(["run", "batch_size", "device"], sort=False):
        lead = {"run": run} if multi else {}
        ok = cells[cells["status"] == "ok"].sort_values("samples_per_sec", ascending=False)
        if ok.empty:
            rows.append({**lead, "batch size": int(batch), "device": device, "fastest": status_text(cells.iloc[0]),
                         "samples/s [95% CI]": "", "next": "", "margin [95% CI]": ""})
            numeric.append({**lead, "batch_size": int(batch), "device": device, "fastest": None})
            continue
        first = ok.iloc[0]
        second = ok.iloc[1] if len(ok) > 1 else None
        margin = ratio_of(first, second)
        rows.append({
            **lead,
            "batch size": int(batch),
            "device": device,
            "fastest": first["label"],
            "samples/s [95% CI]": rate_with_interval(first),
            "next": second["label"] if second is not None else "",
            "margin [95% CI]": ratio_text(*margin) if second is not None else "",
        })
        numeric.append({**lead, "batch_size": int(batch), "device": device, "fastest": first["label"],
                        "samples_per_sec": first["samples_per_sec"], "samples_per_sec_low": first["samples_per_sec_low"],
                        "samples_per_sec_high": first["samples_per_sec_high"],
                        "next": second["label"] if second is not None else None,
                        "margin": margin[0], "margin_low": margin[1], "margin_high": margin[2]})
    shown = frame[frame["label"].isin([r["fastest"] for r in rows])]
    notes = _noisy_note(shown) + _one_process_note(shown[shown["status"] == "ok"])
    notes.append("margin: the fastest cell's samples/s over the next one's, with the ratio's 95% interval (an "
                 "interval that includes 1.00x is a tie)")
    return View("Fastest configuration per batch size and device", pd.DataFrame(rows), notes,
                pd.DataFrame(numeric))


def view_ops(frame: pd.DataFrame, top: int = 12) -> View:
    """The op tables of profiled cells (from `sparsebench profile`'s results.jsonl)."""
    profiled = frame[frame["profile"].notna()]
    if profiled.empty:
        raise UserError("report --view ops: these results hold no profiles (write them with `sparsebench profile`)")
    rows = []
    for _, cell in profiled.iterrows():
        prof = cell["profile"]
        for op in prof["ops"][:top]:
            rows.append({
                **({"run": cell["run"]} if _multi_run(frame) else {}),
                "cell": cell["label"], "op": op["op_type"], "phase": op["phase"], "category": op["category"],
                "ms/step": f"{op['ms_per_step']:.2f}", "share": f"{op['share_pct']:.1f}%",
                "calls/step": f"{op['calls_per_step']:.1f}",
            })
    walls = ", ".join(f"{c['label']} {c['profile']['step_wall_ms']:.1f} ms" for _, c in profiled.iterrows())
    notes = [f"top {top} ops per cell by time; share = share of all op time on TF's compute threads",
             f"step wall time: {walls}"]
    return View("Where each step's time goes, op by op", pd.DataFrame(rows), notes, None)


def ps_traffic(row: pd.Series) -> list[dict[str, dict[str, float]]]:
    """Each process's `cluster.ps_bytes_per_step` (a merged record keeps one cluster per
    process), leaving out processes that measured none (a remote cluster, no `ss`)."""
    cluster = row.get("cluster")
    clusters = cluster if isinstance(cluster, list) else [cluster]
    measured = []
    for c in clusters:
        traffic = c.get("ps_bytes_per_step") if isinstance(c, dict) else None
        if isinstance(traffic, dict) and traffic and all(
                isinstance(t, dict) and all(isinstance(t.get(k), (int, float)) and not isinstance(t.get(k), bool)
                                            and math.isfinite(t[k]) and t[k] >= 0
                                            for k in ("sent", "received")) for t in traffic.values()):
            measured.append(traffic)  # anything else (a hand-edited file) counts as not measured
    return measured


def bytes_per_example(row: pd.Series) -> float | None:
    """All PS tasks' bytes sent and received per example (per step / batch size), the
    median over the cell's processes; None where none was measured."""
    per_process = [sum(t["sent"] + t["received"] for t in traffic.values()) for traffic in ps_traffic(row)]
    if not per_process or not row.get("batch_size"):
        return None
    return statistics.median(per_process) / float(row["batch_size"])


def _bytes_text(value: float) -> str:
    for unit, size in (("MB", 1e6), ("KB", 1e3)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.3g} B"


def _task_count(value) -> str:
    """A record's task count as text; "?" where it holds none (a hand-edited record)."""
    return str(int(value)) if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(
        value) else "?"


def view_traffic(frame: pd.DataFrame) -> View:
    """Parameter-server cells: what each PS task moved per step, per example, and the
    fused layout's bytes against the best (fewest bytes) stock layout of the same cluster
    shape, optimizer and batch size."""
    ps = frame[frame["strategy"] == "parameter_server"]
    if ps.empty:
        raise UserError("report --view traffic: these results hold no parameter-server cells "
                        "(strategy = \"parameter_server\", e.g. the distributed suite)")
    multi = _multi_run(frame)
    ps = ps.assign(_bytes=[bytes_per_example(row) for _, row in ps.iterrows()])
    group = ["run", "ps_tasks", "worker_tasks", "optimizer", "batch_size"]
    rows, numeric = [], []
    for _, cell in ps.iterrows():
        same = ps
        for key in group:
            same = same[same[key] == cell[key]]
        stock = same[(same["variant"] != "fused_custom_op") & same["_bytes"].notna()]
        best = stock.loc[stock["_bytes"].idxmin()] if not stock.empty else None
        mine = cell["_bytes"]
        fewer = (best["_bytes"] / mine if best is not None and mine and cell["variant"] == "fused_custom_op"
                 else None)
        measured = ps_traffic(cell)
        per_task = "; ".join(
            f"{task} {_bytes_text(statistics.median([p[task]['received'] for p in measured if task in p]))} in / "
            f"{_bytes_text(statistics.median([p[task]['sent'] for p in measured if task in p]))} out"
            for task in sorted({task for p in measured for task in p}))
        rows.append({**({"run": cell["run"]} if multi else {}), "cell": cell["label"], "optimizer": cell["optimizer"],
                     "PS x workers": f"{_task_count(cell['ps_tasks'])} x {_task_count(cell['worker_tasks'])}",
                     "samples/s [95% CI]": rate_with_interval(cell),
                     "per PS task and step": per_task or "not measured",
                     "bytes/example": _bytes_text(mine) if mine else "",
                     "vs best stock": f"{fewer:.1f}x fewer than {best['label']}" if fewer else ""})
        numeric.append({**({"run": cell["run"]} if multi else {}), "cell": cell["label"], "optimizer": cell["optimizer"],
                        "ps_tasks": cell["ps_tasks"], "worker_tasks": cell["worker_tasks"],
                        "samples_per_sec": cell["samples_per_sec"], "bytes_per_example": mine,
                        "best_stock": best["label"] if best is not None else None, "times_fewer_bytes": fewer})
    notes = ["bytes: what each PS task sent and received over all its TCP connections during the timed windows "
             "(the kernel's counters, as `ss -tinp` reports them), per train step of any worker; bytes/example sums "
             "the PS tasks and divides by the batch size",
             "vs best stock: the stock layout (row_ or col_partitioned) with the fewest bytes per example in the same "
             "cluster shape, optimizer and batch size",
             "on one machine the tasks share its cores and talk over loopback: samples/s show the PS machinery's "
             "cost, not what a cluster of machines would reach"]
    return View("Parameter-server traffic per step and per example", pd.DataFrame(rows), notes, pd.DataFrame(numeric))


def view_projection(loaded: Loaded, settings: "projection.Settings | None" = None) -> View:
    """Forecasts for larger clusters from profiled PS cells, after the check of the model on
    the profiled machine's own measured cells (projection.py)."""
    from . import projection

    cores = {run["label"]: _number_or_none(field_at((run["header"] or {}).get("environment") or {}, "cores_available"))
             for run in loaded.runs}
    rows, notes = projection.projection(loaded.frame, cores, settings or projection.Settings())
    shown = []
    for r in rows:
        shown.append({
            "layer": r["model"], **({"cell": r["cell"]} if any(x["cell"] for x in rows) else {}),
            "PS x workers": f"{r['ps']} x {r['workers']}", "network": r["network"],
            "samples/s": sig3(r["samples_per_sec"]), "bottleneck": r["bottleneck"],
            "next bound": f"{r['next_bound']} {sig3(r['next_bound_samples_per_sec'])}",
            **({"measured": sig3(r["measured_samples_per_sec"]),
                "error": f"{r['error_pct']:+.1f}%" if r["error_pct"] is not None else ""}
               if any(x["error_pct"] is not None for x in rows) else {}),
        })
    return View("Projected samples/s of larger parameter-server clusters", pd.DataFrame(shown), notes,
                pd.DataFrame(rows))


def _number_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


def default_view(loaded: Loaded) -> str:
    if loaded.frame["profile"].notna().any():
        return "ops"
    suites = set(loaded.frame["suite"].dropna())
    return "talk" if suites == {"gpu-vs-cpu"} else "matrix"


def build_view(loaded: Loaded, view: str, rows: str | None = None, cols: str | None = None, metric: str = "samples_per_sec",
               projection_settings=None) -> View:
    frame = loaded.frame
    if view == "projection":
        return view_projection(loaded, projection_settings)
    if view == "matrix":
        return view_matrix(frame)
    if view == "talk":
        return view_talk(frame)
    if view == "best":
        return view_best(frame)
    if view == "ops":
        return view_ops(frame)
    if view == "traffic":
        return view_traffic(frame)
    if view == "pivot":
        if not rows or not cols:
            raise UserError("report --view pivot: give --rows AXIS and --cols AXIS")
        return view_pivot(frame, rows, cols, metric)
    raise UserError(f"report --view {view}: unknown view; views: {', '.join(VIEWS)}")


# -- renderers -------------------------------------------------------------------------
def render_text(view: View) -> str:
    lines = [view.title, "", render_table(list(view.table.columns), view.table.astype(str).values.tolist(), "text")]
    lines += [""] + view.notes if view.notes else []
    return "\n".join(lines)


def render_markdown(view: View) -> str:
    lines = [f"**{view.title}**", "",
             render_table(list(view.table.columns), view.table.astype(str).values.tolist(), "markdown")]
    if view.notes:
        lines += [""] + [f"- {markdown_text(note)}" for note in view.notes]
    return "\n".join(lines)


def render_csv(view: View) -> str:
    return (view.numeric if view.numeric is not None else view.table).to_csv(index=False)


def render_json(loaded: Loaded) -> str:
    """The stable per-cell JSON (the keys of results.JSON_KEYS), whatever the view."""
    records = loaded.frame[list(JSON_KEYS)].astype(object).where(loaded.frame[list(JSON_KEYS)].notna(), None)
    return json.dumps(records.to_dict(orient="records"), indent=2, default=_json_default)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def render(loaded: Loaded, fmt: str = "table", view: str | None = None, rows: str | None = None,
           cols: str | None = None, metric: str = "samples_per_sec", projection_settings=None) -> str:
    """Text for every format but html (see html.py). Warnings are the caller's to print."""
    if fmt == "json" and view != "projection":
        return render_json(loaded)
    chosen = build_view(loaded, view or default_view(loaded), rows, cols, metric, projection_settings)
    if fmt == "json":  # the projection's own rows: they are not cells
        numeric = chosen.numeric.astype(object).where(chosen.numeric.notna(), None)
        return json.dumps({"rows": numeric.to_dict(orient="records"), "notes": chosen.notes}, indent=2,
                          default=_json_default)
    if fmt == "markdown":
        return render_markdown(chosen)
    if fmt == "csv":
        return render_csv(chosen)
    return render_text(chosen)

