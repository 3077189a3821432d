"""`report --format html`: one self-contained page, readable offline.

Plots are embedded as base64 PNG, styles inline, no scripts or external resources. Every
string that came from a results file is escaped: a suite description or an error message
can hold anything.
"""

from __future__ import annotations

import base64
import html
import io

import matplotlib.pyplot as plt

from ..machine import field_at
from .plots import figures
from ..tables import looks_numeric
from .report import Loaded, View, build_view, default_view, view_matrix

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; } td.text { text-align: left; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 12px; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
.note { color: #555; font-size: 13px; }
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def table_html(view: View) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in view.table.columns)
    body = []
    for _, row in view.table.iterrows():
        cells = []
        for column in view.table.columns:
            value = row[column]
            cells.append(f"<td{'' if looks_numeric(value) else ' class=text'}>{_e(value)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    notes = "".join(f"<p class=note>{_e(n)}</p>" for n in view.notes)
    return f"<h2>{_e(view.title)}</h2><table><tr>{head}</tr>{''.join(body)}</table>{notes}"


def figure_png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def environment_html(run: dict) -> str:
    env, meta = run["header"].get("environment") or {}, run["header"].get("run") or {}
    flags = field_at(env, "cpu", "key_flags")
    gpu_list = field_at(env, "gpus")
    gpus = ", ".join(f"{field_at(g, 'name')} ({field_at(g, 'memory_total_mb')} MiB)"
                     for g in (gpu_list if isinstance(gpu_list, list) else [])) or "none"
    rows = [
        ("results file", run["path"]),
        ("suite", meta.get("suite")),
        ("command", meta.get("command")),
        ("started", meta.get("started_at")),
        ("git", field_at(meta, "git", "commit")),
        ("CPU", field_at(env, "cpu", "model")),
        ("CPU flags", " ".join(map(str, flags)) if isinstance(flags, list) else flags),
        ("cores", f"{field_at(env, 'cores_available')} available / {field_at(env, 'cores_logical')} logical"),
        ("memory", f"{field_at(env, 'memory', 'total_gb')} GiB"),
        ("GPUs", gpus),
        ("TensorFlow", field_at(env, "tensorflow", "version") or field_at(env, "tensorflow", "error")),
        ("oneDNN build", field_at(env, "tensorflow", "onednn_built")),
        ("CUDA build", field_at(env, "tensorflow", "build", "is_cuda_build")),
    ]
    body = "".join(f"<tr><th>{_e(k)}</th><td class=text>{_e(v)}</td></tr>" for k, v in rows)
    suite_text = meta.get("suite_text", "")
    overrides = [str(o) for o in meta.get("overrides") or []] if isinstance(meta.get("overrides"), list) else []
    extra = f"<p class=note>overrides: {_e(' '.join(overrides))}</p>" if overrides else ""
    return (
        f"<h3>Run {_e(run['label'])}</h3><table>{body}</table>{extra}"
        f"<details><summary>suite settings</summary><pre>{_e(suite_text)}</pre></details>"
    )


def render_html(loaded: Loaded, view: str | None, rows: str | None, cols: str | None, metric: str,
                projection_settings=None) -> str:
    chosen = build_view(loaded, view or default_view(loaded), rows, cols, metric, projection_settings)
    parts = [table_html(chosen)]
    if chosen.title != "All cells":
        parts.append(table_html(view_matrix(loaded.frame)))
    plots = figures(loaded.frame)
    if plots:
        parts.append("<h2>Plots</h2>")
        for name, fig in plots.items():
            parts.append(f"<img alt='{_e(name)}' src='data:image/png;base64,{figure_png(fig)}'>")
    parts.append("<h2>Environment and settings</h2>")
    parts += [environment_html(run) for run in loaded.runs]
    suites = ", ".join(sorted(set(loaded.frame["suite"].dropna()))) or "sparsebench"
    title = f"sparsebench report: {suites}"
    data = f"{len(loaded.frame)} cells from {len(loaded.runs)} run(s): " + ", ".join(r["path"] for r in loaded.runs)
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{_e(title)}</h1><p class=note>{_e(data)}</p>{''.join(parts)}</body></html>"
    )
