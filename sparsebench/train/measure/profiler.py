"""Where a training step's time goes: TensorFlow profiler traces -> op tables and a trace.

The worker wraps N steady-state steps (after warm-up) in `tf.profiler.experimental`
start/stop with the logdir `DIR/<cell>`, so TensorBoard's profile plugin reads
`DIR/<cell>/plugins/profile/<run>/*.xplane.pb` as it is. This module then reads that
XPlane protobuf itself (it ships with TensorFlow; no xprof needed) and writes:

- `ops.csv` / `ops.json`: per op type, ms per step, share of all op time, calls per step,
  and per phase (forward / backward / optimizer / other);
- `trace.json`: every op event as a Chrome/Perfetto trace (open it at ui.perfetto.dev or
  chrome://tracing).

It runs in the worker (reading XPlane needs TensorFlow's protobuf classes); the text
tables the CLI prints from these summaries live in `sparsebench.analyze.profile`.

Op time is the sum of op durations on TensorFlow's executor threads (`tf_Compute` lines;
only `node:OpType` events, see `is_op_event`), so with 2 threads busy it can exceed wall
time, and time between ops (scheduling, Python) is not in it: the shares are shares of op
time, and the step's wall time is reported beside them.

Phases come from the name scopes the trainer sets: `forward/...` (the model),
`gradient_tape/...` (backward), `optimizer/...` (the update).
"""

from __future__ import annotations

import csv
import glob
import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PHASES = ("forward", "backward", "optimizer", "other")
# Op events are read from TensorFlow's executor threads on the host. On a GPU cell they
# are the time to launch each kernel, not its time on the GPU (the device's own lines in
# the trace are not parsed yet, and no GPU has checked this code), so say so.
PS_TASKS_NOTE = ("parameter-server cell: op times summed over every PS and worker task (traced through their "
                 "profiler servers); the step time is the wall time per step of one worker task")
PS_COORDINATOR_NOTE = ("parameter-server cell on a remote cluster: this is the coordinator's own trace (its tasks run "
                       "no profiler server sparsebench knows of); the tasks' op times are not in it")
GPU_HOST_TIME_NOTE = ("GPU cell: op times are host-side (kernel launch) time on TensorFlow's executor threads, "
                      "not GPU kernel time; open the TensorBoard profile for device time")
OP_CATEGORIES = {
    # op type -> category, for the stacked bars; anything else is "other"
    "SparseTensorDenseMatMul": "sparse matmul",
    "SparsebenchFusedLayer": "fused custom op", "SparsebenchFusedLayerGrad": "fused custom op",
    "SparsebenchFusedSgdUpdate": "fused custom op", "SparsebenchFusedLazyAdamUpdate": "fused custom op",
    "ResourceGather": "gather", "GatherV2": "gather", "Gather": "gather",
    "UnsortedSegmentSum": "segment sum", "SparseSegmentSum": "segment sum", "SegmentSum": "segment sum",
    "SparseSegmentSumWithNumSegments": "segment sum", "SparseSegmentSumGrad": "segment sum",
    "ResourceScatterSub": "scatter update", "ResourceScatterAdd": "scatter update",
    "ResourceScatterUpdate": "scatter update", "ResourceScatterMax": "scatter update",
    "Unique": "unique", "UniqueV2": "unique",
    "ResourceApplyGradientDescent": "dense update", "ResourceApplyAdam": "dense update",
    "ResourceApplyAdagradV2": "dense update", "ResourceApplyFtrl": "dense update",
    "ResourceSparseApplyAdagradV2": "sparse update", "ResourceSparseApplyFtrl": "sparse update",
    "MatMul": "dense matmul", "_MklMatMul": "dense matmul", "BatchMatMulV2": "dense matmul",
    "_MklBatchMatMulV2": "dense matmul",
}


@dataclass
class OpRow:
    op_type: str
    phase: str
    ms_per_step: float
    share_pct: float
    calls_per_step: float
    category: str


def find_xplanes(logdir: Path) -> list[Path]:
    """The newest profiling session's XPlane files: one per traced host (one for a local
    cell; every task traced, for a parameter-server cell)."""
    runs = sorted(glob.glob(str(Path(logdir) / "plugins" / "profile" / "*")))
    files = sorted(glob.glob(str(Path(runs[-1]) / "*.xplane.pb"))) if runs else []
    if not files:
        raise FileNotFoundError(f"{logdir}: no plugins/profile/*/*.xplane.pb written by the profiler")
    return [Path(f) for f in files]


def _split_event_name(name: str) -> tuple[str, str]:
    """'forward/dense/MatMul:MatMul' -> ('forward/dense/MatMul', 'MatMul')."""
    node, _, op_type = name.rpartition(":")
    return (node, op_type) if node else (name, name)


def is_op_event(name: str) -> bool:
    """TF op events are named `node:OpType`. Executor and thread-pool bookkeeping
    (`ExecutorState::Process`, `ThreadpoolListener::Record`) encloses op events, and
    Eigen's `ParallelFor` or `MemoryAllocation` run inside them: counting those would count
    time twice."""
    return ":" in name and "::" not in name


def phase_of(node: str) -> str:
    if node.startswith("gradient_tape/") or "/gradient_tape/" in node:
        return "backward"
    if node.startswith("optimizer/") or "/optimizer/" in node:
        return "optimizer"
    if node.startswith("forward/") or "/forward/" in node:
        return "forward"
    return "other"


def read_events(xplane_path: Path, host: str | None = None) -> list[dict[str, Any]]:
    """Op events on TF's compute threads: node, op type, start and duration (µs), thread
    (prefixed with `host` where given, and then also recorded as the event's host)."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    space.ParseFromString(Path(xplane_path).read_bytes())
    events = []
    for plane in space.planes:
        names = {key: meta.name for key, meta in plane.event_metadata.items()}
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                name = names.get(event.metadata_id, "")
                if not is_op_event(name):
                    continue
                node, op_type = _split_event_name(name)
                events.append({
                    "node": node, "op_type": op_type, "thread": f"{host} {line.name}" if host else line.name,
                    "host": host,
                    "start_us": (line.timestamp_ns + event.offset_ps / 1000.0) / 1000.0,
                    "dur_us": event.duration_ps / 1e6,
                })
    return events


def op_table(events: list[dict[str, Any]], steps: int) -> list[OpRow]:
    """Per (op type, phase): time and calls per step and share of all op time, largest first."""
    time_us: dict[tuple[str, str], float] = defaultdict(float)
    calls: dict[tuple[str, str], int] = defaultdict(int)
    for e in events:
        key = (e["op_type"], phase_of(e["node"]))
        time_us[key] += e["dur_us"]
        calls[key] += 1
    total = sum(time_us.values()) or 1.0
    rows = [
        OpRow(op, phase, t / 1000.0 / steps, 100.0 * t / total, calls[(op, phase)] / steps,
              OP_CATEGORIES.get(op, "other"))
        for (op, phase), t in time_us.items()
    ]
    return sorted(rows, key=lambda r: r.ms_per_step, reverse=True)


def chrome_trace(events: list[dict[str, Any]], cell_id: str) -> dict[str, Any]:
    threads = {name: i for i, name in enumerate(sorted({e["thread"] for e in events}))}
    t0 = min((e["start_us"] for e in events), default=0.0)
    trace = [{"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": name}}
             for name, tid in threads.items()]
    trace.append({"name": "process_name", "ph": "M", "pid": 1, "args": {"name": cell_id}})
    for e in events:
        trace.append({"name": e["op_type"], "cat": phase_of(e["node"]), "ph": "X", "pid": 1,
                      "tid": threads[e["thread"]], "ts": e["start_us"] - t0, "dur": e["dur_us"],
                      "args": {"node": e["node"]}})
    return {"traceEvents": trace, "displayTimeUnit": "ms"}


def write_outputs(logdir: Path, cell_id: str, steps: int, step_wall_ms: float, note: str | None = None,
                  host_names: dict[str, str] | None = None) -> dict[str, Any]:
    """Parse the profile under `logdir` and write ops.csv, ops.json and trace.json there.
    `host_names` renames traced hosts (their files' names) for the tables, e.g. to `ps:0`."""
    logdir = Path(logdir)
    files = find_xplanes(logdir)
    if len(files) == 1:
        events = read_events(files[0])
    else:  # several traced tasks: each file is named after its host (and port)
        names = host_names or {}
        events = [e for f in files for e in read_events(f, host=names.get(f.name[: -len(".xplane.pb")],
                                                                           f.name[: -len(".xplane.pb")]))]
    rows = op_table(events, steps)
    with open(logdir / "ops.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(asdict(rows[0]).keys()) if rows else ["op_type"])
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))
    by_phase = defaultdict(float)
    for row in rows:
        by_phase[row.phase] += row.ms_per_step
    summary = {
        "cell_id": cell_id,
        "steps": steps,
        "step_wall_ms": step_wall_ms,
        "op_ms_per_step": sum(r.ms_per_step for r in rows),
        "phases_ms_per_step": {p: by_phase.get(p, 0.0) for p in PHASES},
        "ops": [asdict(r) for r in rows],
        "note": note,
    }
    if len(files) > 1:
        by_host: dict[str, float] = defaultdict(float)
        for e in events:
            by_host[e["host"]] += e["dur_us"] / 1000.0 / steps
        summary["hosts_ms_per_step"] = dict(sorted(by_host.items()))
    (logdir / "ops.json").write_text(json.dumps(summary, indent=2))
    (logdir / "trace.json").write_text(json.dumps(chrome_trace(events, cell_id)))
    return summary
