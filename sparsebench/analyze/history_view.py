"""`history`'s output: text and markdown tables, JSON, plots and a self-contained HTML page."""

from __future__ import annotations

import html
import json
import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ..tables import render_table  # noqa: E402
from .history import History, Step, Trend, short_commit  # noqa: E402
from .html import STYLE, figure_png, table_html  # noqa: E402
from .report import View, sig3  # noqa: E402

HISTORY_FORMATS = ("text", "markdown", "json", "html")


def _interval(low: float, high: float) -> str:
    return f"[{sig3(low)}-{sig3(high)}]" if math.isfinite(low) and math.isfinite(high) else ""


def _pct(ratio: float) -> str:
    return f"{(ratio - 1) * 100:+.1f}%"


def _step_text(step: Step) -> str:
    return f"{_pct(step.ratio)} [{_pct(step.low)}, {_pct(step.high)}]"


def method_line(history: History) -> str:
    return (f"steps: PELT (ruptures) candidates on log samples/s per commit, each tested on the commits between "
            f"its neighbouring candidates against the largest split of step-free series (Holm-corrected, alpha "
            f"{history.alpha:g}) and kept when at least {history.min_step * 100:g}%; a step needs 2 commits on each "
            f"side; its interval is Welch's between the two levels")


def summary_rows(history: History) -> list[list[str]]:
    rows = []
    for trend in history.trends:
        first, last = trend.points[0], trend.points[-1]
        steps = "; ".join(f"{_step_text(s)} at {s.range_text()}" for s in trend.steps) or "none"
        rows.append([trend.label, str(len(trend.points)), f"{sig3(first.rate)} {_interval(first.low, first.high)}",
                     f"{sig3(last.rate)} {_interval(last.low, last.high)}", _pct(last.rate / first.rate), steps])
    return rows


COMMIT_HEADER = ["commit", "time", "placed by", "results files"]
SUMMARY_HEADER = ["cell", "commits", "first (samples/s [95% CI])", "latest", "latest/first", "steps"]
STEP_HEADER = ["cell", "commits", "before", "after", "change [95% CI]", "p (Holm)", "commits before/after", "note"]


def step_rows(history: History) -> list[list[str]]:
    rows = []
    for trend in history.trends:
        for s in trend.steps:
            before = trend.points[s.position - 1]
            after = trend.points[s.position]
            near = trend.points[s.position - s.commits_before:s.position + s.commits_after]
            busy = [short_commit(p.commit) for p in near if p.busy]
            note = f"measured on a busy machine at {', '.join(busy)}" if busy else ""
            rows.append([trend.label, s.range_text(), sig3(before.rate), sig3(after.rate), _step_text(s),
                         f"{s.p:.2g}", f"{s.commits_before}/{s.commits_after}", note])
    return rows


def _heading(history: History) -> str:
    commits = history.commits
    first, last = history.placements[0].when, history.placements[-1].when
    return (f"history of {len(history.trends)} cell(s) over {len(commits)} commit(s), "
            f"{first:%Y-%m-%d} .. {last:%Y-%m-%d}, from {len(history.placements)} results file(s)")


def commit_rows(history: History) -> list[list[str]]:
    rows, seen = [], set()
    for p in history.placements:
        if p.key in seen:
            continue
        seen.add(p.key)
        files = [q.path.name for q in history.placements if q.key == p.key]
        rows.append([short_commit(p.commit) if p.commit else p.key, f"{p.when:%Y-%m-%d %H:%M}",
                     "commit" if p.when_source == "commit" else "run start", ", ".join(files)])
    return rows


def render_tables(history: History, fmt: str) -> str:
    """text or markdown: the heading, the steps found, every cell's first and latest rate."""
    steps = step_rows(history)
    bold = (lambda t: f"**{t}**") if fmt == "markdown" else (lambda t: t)
    parts = [bold(_heading(history)), ""]
    if steps:
        parts += [bold(f"{len(steps)} step(s)"), "", render_table(STEP_HEADER, steps, fmt), ""]
    else:
        parts += ["no step found", ""]
    parts += [bold("cells"), "", render_table(SUMMARY_HEADER, summary_rows(history), fmt), "",
              bold("commits (oldest first)"), "",
              render_table(COMMIT_HEADER, commit_rows(history), fmt), "",
              method_line(history)]
    return "\n".join(parts)


def render_json(history: History) -> str:
    def step(s: Step) -> dict:
        return {"before": s.before, "after": s.after, "ratio": s.ratio, "ratio_low": s.low, "ratio_high": s.high,
                "p_holm": s.p, "commits_before": s.commits_before, "commits_after": s.commits_after}

    def trend(t: Trend) -> dict:
        return {"cell_id": t.cell_id, "label": t.label, "candidates": t.candidates,
                "steps": [step(s) for s in t.steps],
                "points": [{"commit": p.commit, "time": p.when.isoformat(), "files": p.files,
                            "samples_per_sec": p.rate, "samples_per_sec_low": p.low, "samples_per_sec_high": p.high,
                            "processes": p.processes, "windows": p.groups, "busy": p.busy}
                           for p in t.points]}

    payload = {"alpha": history.alpha, "min_step": history.min_step, "method": method_line(history),
               "commits": [{"commit": p.commit, "time": p.when.isoformat(), "placed_by": p.when_source,
                            "dirty": p.dirty, "file": str(p.path)} for p in history.placements],
               "cells": [trend(t) for t in history.trends], "warnings": history.warnings}
    return json.dumps(payload, indent=2, allow_nan=False, default=str)


# -- plots -----------------------------------------------------------------------------
def _draw(ax, trend: Trend, commits: list[str]) -> None:
    xs = [p.position for p in trend.points]
    rates = [p.rate for p in trend.points]
    low = [max(p.rate - p.low, 0) for p in trend.points]
    high = [max(p.high - p.rate, 0) for p in trend.points]
    ax.errorbar(xs, rates, yerr=[low, high], fmt="o-", ms=4, lw=1, capsize=3, color="tab:blue")
    busy = [(p.position, p.rate) for p in trend.points if p.busy]
    if busy:
        ax.plot(*zip(*busy), "o", ms=9, mfc="none", mec="tab:red", label="busy machine")
    bounds = [0, *[s.position for s in trend.steps], len(trend.points)]
    for a, b in zip(bounds, bounds[1:]):  # each level's geometric mean
        level = math.exp(sum(math.log(r) for r in rates[a:b]) / (b - a))
        ax.plot([xs[a] - 0.3, xs[b - 1] + 0.3], [level, level], color="tab:orange", lw=2, alpha=0.8)
    for s in trend.steps:
        ax.axvline(xs[s.position] - 0.5, color="tab:red", ls="--", lw=1)
        ax.annotate(_pct(s.ratio), (xs[s.position] - 0.5, max(rates) * 1.02), color="tab:red", fontsize=8,
                    ha="center")
    ax.set_ylim(bottom=0, top=max(p.high if math.isfinite(p.high) else p.rate for p in trend.points) * 1.12)
    ax.set_xticks(range(len(commits)))
    ax.set_xticklabels([short_commit(c) if not c.startswith("run ") else c[4:] for c in commits], rotation=45,
                       ha="right", fontsize=7)
    ax.set_title(trend.label, fontsize=9, loc="left")
    ax.grid(alpha=0.3)


CHARACTERS_PER_INCH = 10  # of a fontsize-10 title


def figure(history: History, trends: list[Trend] | None = None, columns: int = 4):
    """One panel per cell: samples/s per commit with its 95% interval, the levels between
    steps, each step marked with its size. The y axes start at zero."""
    chosen = history.trends if trends is None else trends
    columns = max(1, min(columns, len(chosen)))
    rows = math.ceil(len(chosen) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for ax, trend in zip(axes.flat, chosen):
        _draw(ax, trend, history.commits)
    for ax in list(axes.flat)[len(chosen):]:
        ax.axis("off")
    caption = ("samples/s per commit (95% intervals; orange: levels between steps; red dashes: steps; red rings: "
               "measured on a busy machine)")
    # Wrapped to the figure's width (about 10 characters an inch at this size): one line ran
    # off the right edge of a one- or two-panel figure.
    fig.suptitle(textwrap.fill(caption, int(CHARACTERS_PER_INCH * fig.get_figwidth())), fontsize=10, x=0.01, ha="left")
    fig.supylabel("samples/s")
    fig.tight_layout()
    return fig


def write_plot(history: History, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    fig = figure(history)
    written = []
    for ext in ("png", "svg"):
        path = folder / f"history.{ext}"
        fig.savefig(path, dpi=100)
        written.append(path)
    plt.close(fig)
    return written


def _table(title: str, header: list[str], rows: list[list[str]]) -> str:
    return table_html(View(title, pd.DataFrame(rows, columns=header), [], None))


def render_html(history: History) -> str:
    stepped = [t for t in history.trends if t.steps]
    parts = [f"<h1>sparsebench history</h1><p class=note>{html.escape(_heading(history))}</p>"]
    if stepped:
        parts.append(_table("Steps", STEP_HEADER, step_rows(history)))
        parts.append(f"<img alt='cells with a step' src='data:image/png;base64,"
                     f"{figure_png(figure(history, stepped, 2))}'>")
    else:
        parts.append("<h2>Steps</h2><p>no step found</p>")
    parts += [_table("Every cell", SUMMARY_HEADER, summary_rows(history)),
              f"<img alt='every cell' src='data:image/png;base64,{figure_png(figure(history))}'>",
              _table("Commits", COMMIT_HEADER, commit_rows(history)),
              f"<p class=note>{html.escape(method_line(history))}</p>"]
    if history.warnings:
        parts.append("<h2>Warnings</h2>" + "".join(f"<p class=note>{html.escape(w)}</p>" for w in history.warnings))
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>sparsebench history</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")


def render(history: History, fmt: str) -> str:
    if fmt == "json":
        return render_json(history)
    if fmt == "html":
        return render_html(history)
    return render_tables(history, fmt)
