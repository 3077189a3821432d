"""Plots of a run, written as PNG and SVG. Only figures whose axis actually varies are drawn.

Honest axes: every throughput axis starts at zero; error bars are the stored 95% interval
of the median; titles say what was measured and on which machine (the fingerprint's CPU).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .. import stats  # noqa: E402
from ..errors import UserError  # noqa: E402
from ..plan.spec import BASELINE_VARIANT, PARTITIONED_VARIANTS  # noqa: E402
from .report import AXIS_COLUMNS, VARIANT_AXES  # noqa: E402

GROUP_AXES = [a for a in AXIS_COLUMNS if a != "batch_size"]


def _ok(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["status"] == "ok"].copy()


def _machine(frame: pd.DataFrame) -> str:
    machines = sorted(set(frame["machine"].dropna()))
    return machines[0] if len(machines) == 1 else f"{len(machines)} machines"


def _suite(frame: pd.DataFrame) -> str:
    return ", ".join(sorted(set(frame["suite"].dropna()))) or "?"


def _series_label(row: pd.Series, drop: set[str], varying: list[str]) -> str:
    parts = []
    for axis in varying:
        if axis in drop:
            continue
        value = row[axis]
        if axis == "variant":
            parts.append(str(value))
        elif axis == "run":
            parts.append(f"run {value}")
        elif value is not None and not (isinstance(value, float) and pd.isna(value)):
            parts.append(f"{axis}={value}")
    return ", ".join(parts) or "all"


def _varying(frame: pd.DataFrame, axes: list[str]) -> list[str]:
    return [a for a in axes if frame[a].astype(str).nunique() > 1]


def _errorbars(cells: pd.DataFrame):
    low = (cells["samples_per_sec"] - cells["samples_per_sec_low"]).clip(lower=0)
    high = (cells["samples_per_sec_high"] - cells["samples_per_sec"]).clip(lower=0)
    return [low.fillna(0).to_numpy(), high.fillna(0).to_numpy()]


def _line_plot(frame: pd.DataFrame, x: str, xlabel: str, title: str, ideal: bool = False):
    """samples/s against `x`, one line per combination of the other varying axes."""
    axes_all = [*GROUP_AXES, "run"]
    varying = _varying(frame, axes_all)
    group_keys = [a for a in varying if a != x]
    fig, ax = _figure()
    groups = frame.groupby(group_keys, dropna=False) if group_keys else [((), frame)]
    for i, (_, cells) in enumerate(groups):
        cells = cells.sort_values(x)
        label = _series_label(cells.iloc[0], {x}, varying)
        ax.errorbar(cells[x], cells["samples_per_sec"], yerr=_errorbars(cells), capsize=3, label=label,
                    color=_COLORS(i % 20), marker=_MARKERS[i % len(_MARKERS)],
                    linestyle=_LINESTYLES[(i // 10) % len(_LINESTYLES)])
        if ideal and len(cells):
            first = cells.iloc[0]
            per_unit = first["samples_per_sec"] / first[x]
            ax.plot(cells[x], cells[x] * per_unit, linestyle="--", color=_COLORS(i % 20), alpha=0.6,
                    label=f"ideal linear scaling ({label})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("training throughput (samples/s)")
    ticks = sorted(frame[x].unique())
    if x in ("batch_size", "shards", "workers") and min(ticks) > 0 and max(ticks) / min(ticks) >= 4:
        ax.set_xscale("log", base=2)  # powers of two, evenly spaced
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    _finish(ax, fig, title)
    return fig


_COLORS = plt.get_cmap("tab20")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_LINESTYLES = ("-", "--", ":")


def _figure():
    return plt.subplots(figsize=(11, 5.5))


TITLE_CHARACTERS = 110  # at fontsize 10 on an 11-inch figure


def _finish(ax, fig, title: str) -> None:
    """Title (wrapped and left-aligned: a long one used to run off the figure's left
    edge), grid, and the legend outside the axes so it never hides data."""
    ax.set_title(textwrap.fill(title, TITLE_CHARACTERS), fontsize=10, loc="left")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()


def _speedup_plot(frame: pd.DataFrame, title: str):
    """Bars of each variant's speedup over the baseline cell that agrees on every other axis,
    with the 95% interval of the ratio (both cells resampled: processes, then windows)."""
    keys = [a for a in [*AXIS_COLUMNS, "run"] if a not in VARIANT_AXES]
    baselines = {tuple(str(row[k]) for k in keys): row for _, row in frame[frame["variant"] == BASELINE_VARIANT].iterrows()}
    others = frame[frame["variant"] != BASELINE_VARIANT].copy()
    speedups, lows, highs = [], [], []
    for _, row in others.iterrows():
        base = baselines.get(tuple(str(row[k]) for k in keys))
        if base is None or not base["samples_per_sec"]:
            speedups.append(float("nan")), lows.append(float("nan")), highs.append(float("nan"))
            continue
        speedups.append(row["samples_per_sec"] / base["samples_per_sec"])
        low, high = (stats.ratio_interval(base["process_windows"], row["process_windows"])
                     if base["process_windows"] and row["process_windows"] else (float("nan"), float("nan")))
        lows.append(low), highs.append(high)
    others["speedup"], others["speedup_low"], others["speedup_high"] = speedups, lows, highs
    others = others.dropna(subset=["speedup"])
    if others.empty:
        return None
    varying = _varying(others, [*GROUP_AXES, "run"])
    others["series"] = [_series_label(r, {"batch_size"}, varying) for _, r in others.iterrows()]
    batches = sorted(others["batch_size"].unique())
    series = list(dict.fromkeys(others["series"]))
    fig, ax = _figure()
    width = 0.8 / max(len(series), 1)
    for i, name in enumerate(series):
        cells = others[others["series"] == name].set_index("batch_size")
        xs = [b for b in range(len(batches)) if batches[b] in cells.index]
        values = [cells.loc[batches[x]] for x in xs]
        yerr = [[max(0.0, v["speedup"] - v["speedup_low"]) if pd.notna(v["speedup_low"]) else 0.0 for v in values],
                [max(0.0, v["speedup_high"] - v["speedup"]) if pd.notna(v["speedup_high"]) else 0.0 for v in values]]
        ax.bar([x + i * width for x in xs], [v["speedup"] for v in values], width=width, label=name,
               color=_COLORS(i % 20), yerr=yerr, capsize=3, ecolor="black")
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label=f"{BASELINE_VARIANT} (1.0x)")
    ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(batches))])
    ax.set_xticklabels([str(b) for b in batches])
    ax.set_xlabel("batch size (examples)")
    ax.set_ylabel(f"speedup over {BASELINE_VARIANT} (x)")
    ax.set_ylim(bottom=0)
    _finish(ax, fig, title)
    return fig


# Ops whose trace event spans the ops they run (a function call, the cluster coordinator's
# closure): counted beside their contents they doubled the time, and made "other" 63-83% of
# every parameter-server bar.
WRAPPER_OPS = {"PartitionedCall", "StatefulPartitionedCall", "Enqueue", "RemoteCall"}
WRAPPER_PREFIXES = ("__inference_", "__forward_", "__backward_")


def wraps_other_ops(op_type: str) -> bool:
    name = op_type.strip()
    return name in WRAPPER_OPS or name.startswith(WRAPPER_PREFIXES)


def _op_category_plot(profiled: pd.DataFrame, title: str):
    """Stacked bars: each profiled cell's op time per step, split by op category (ops that
    only wrap other ops left out: their time is their contents')."""
    per_cell = []
    for _, cell in profiled.iterrows():
        totals: dict[str, float] = {}
        for op in cell["profile"]["ops"]:
            if wraps_other_ops(op["op_type"]):
                continue
            totals[op["category"]] = totals.get(op["category"], 0.0) + op["ms_per_step"]
        per_cell.append((cell["label"], totals))
    categories = sorted({c for _, t in per_cell for c in t}, key=lambda c: (c == "other", c))
    fig, ax = _figure()
    bottoms = [0.0] * len(per_cell)
    for i, category in enumerate(categories):
        heights = [t.get(category, 0.0) for _, t in per_cell]
        ax.bar(range(len(per_cell)), heights, bottom=bottoms, label=category, color=_COLORS(i % 20))
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    ax.set_xticks(range(len(per_cell)))
    ax.set_xticklabels([label for label, _ in per_cell], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("op time per step (ms, summed over TF compute threads)")
    ax.set_ylim(bottom=0)
    _finish(ax, fig, title)
    return fig


PLOTS_NEED = ("a profile (op categories)", "several batch sizes", "the baseline variant and another",
              "several intra-op thread counts", "several Hogwild workers", "several shard counts")


def figures(frame: pd.DataFrame) -> dict[str, object]:
    """name -> matplotlib figure, for every plot this data supports."""
    ok = _ok(frame)
    if ok.empty:
        return {}
    where = f"suite {_suite(ok)} on {_machine(ok)}"
    missing = frame[frame["status"] != "ok"]
    if len(missing):
        reasons = ", ".join(sorted({f"{s}: {r}" if r else str(s) for s, r in zip(missing["status"], missing["reason"])}))
        where += f"; {len(missing)} cells not shown ({reasons})"
    out: dict[str, object] = {}
    profiled = ok[ok["profile"].notna()] if "profile" in ok else ok.iloc[0:0]
    if len(profiled):  # bars of one profile each: no error bars to qualify
        out["step_time_by_op_category"] = _op_category_plot(
            profiled, f"Step time by op category ({where}; function-call ops, which hold other ops' time, left out)")
        return out
    if not ok["run_to_run_measured"].fillna(False).astype(bool).all():
        where += "; error bars of one-process cells leave out run-to-run noise"
    if ok["batch_size"].nunique() > 1:
        out["throughput_vs_batch"] = _line_plot(ok, "batch_size", "batch size (examples)",
                                                f"Training throughput vs batch size ({where})")
    if BASELINE_VARIANT in set(ok["variant"]) and ok["variant"].nunique() > 1:
        fig = _speedup_plot(ok, f"Speedup over the {BASELINE_VARIANT} baseline ({where})")
        if fig is not None:
            out["speedup"] = fig
    if ok["intra_op_threads"].nunique() > 1:
        out["thread_scaling"] = _line_plot(ok, "intra_op_threads", "TF intra-op threads (0 = TF default)",
                                           f"Thread scaling, one line per other setting ({where})")
    if ok["workers"].nunique() > 1:
        out["hogwild_scaling"] = _line_plot(ok, "workers", "Hogwild worker threads",
                                            f"Hogwild scaling, with ideal linear scaling ({where})", ideal=True)
    partitioned = ok[ok["variant"].isin(PARTITIONED_VARIANTS)]
    if partitioned["shards"].nunique() > 1:
        # Only the partitioned variants have shards: the others would pile up at x=1.
        others = ok["variant"].nunique() - partitioned["variant"].nunique()
        left_out = f"; {others} unpartitioned variant(s) not shown" if others else ""
        out["shards"] = _line_plot(partitioned, "shards", "shards of W",
                                   f"Throughput vs shards, rows vs columns ({where}{left_out})")
    return out


def write_plots(loaded, folder: Path) -> list[Path]:
    """Write every supported plot as PNG and SVG into `folder`; return the paths."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{folder}: cannot create plots folder: {exc.strerror}") from None
    written = []
    for name, fig in figures(loaded.frame).items():
        for ext in ("png", "svg"):
            path = folder / f"{name}.{ext}"
            try:
                fig.savefig(path, dpi=120)
            except OSError as exc:
                raise UserError(f"{path}: cannot write plot: {exc.strerror}") from None
            written.append(path)
        plt.close(fig)
    return written
