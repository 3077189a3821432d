"""`report --view projection`: samples/s of larger parameter-server clusters, forecast
from what one profiled cluster measured.

A loopback cluster on a 2-core machine says nothing directly about 16 PS machines on a
25 Gbit/s network: its tasks share two cores and loopback is free. What it does measure
holds per step whatever the cluster: how many CPU milliseconds each kind of task spends on
a step (`sparsebench profile` reads every local task's process CPU time over untraced
steps, `cluster.cpu_ms_per_step`) and how many bytes each PS task moves per step
(`cluster.ps_bytes_per_step`). The forecast puts those per-step costs against what a
cluster supplies, each as a bound on the cluster's steps per second, and takes the
tightest (the bottleneck):

- worker compute: W workers x C cores x 1000 / (worker CPU ms per step)
- PS compute: P tasks x C cores x 1000 / (all PS tasks' CPU ms per step)
- coordinator: 1000 / (coordinator CPU ms per step); one Python process, one core
- PS network: G / (bytes per step of one PS task, the larger direction)
- worker network: W x G / (bytes per step of one worker, the larger direction)
- worker round trip: W x 1000 / (one worker's step done one part after another: its CPU
  on its cores, its wait for the PS tasks' share of the step on theirs, the transfer on its
  link). Measured on the 2-core machine, taking each part at full CPU time (one core)
  predicted a 1-worker cell 44% low; on its task's cores, 12% high.

How per-step costs change with P: bytes per PS task are the layout's fixed part (for the
fused layout the `[batch, out_dim]` tensors and the row counts each PS task gets whatever P
is) plus the entries' part divided over the P tasks (keys are hashed, shards are `mod`).
CPU: with profiles at two or more PS counts of the same cell, each task kind's CPU per step
is fitted as a + b x P (least squares); with one, all PS CPU is taken to divide over the
tasks (b = 0), which is stated. Every figure the forecast rests on is listed in its notes.

Where results of the same cells measured on the profiled machine are given too, the view
first predicts them the same way with the tasks sharing that machine's cores over
loopback (the machine's cores against the CPU all tasks spend per step, and the round
trip), and shows the error: the check of the model this machine can make.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..errors import UserError
from ..tables import sig3

DEFAULT_PS = (4, 8, 16)
DEFAULT_WORKERS = (4, 16, 64)
DEFAULT_NETWORK_GBIT = (10.0, 25.0)
FAMILY = ("variant", "partition_strategy", "optimizer", "batch_size", "out_dim")


@dataclass(frozen=True)
class Settings:
    """What the forecast is asked for: cluster shapes, link speeds, cores per task machine
    (None: the profiled machine's)."""

    ps: tuple[int, ...] = DEFAULT_PS
    workers: tuple[int, ...] = DEFAULT_WORKERS
    network_gbit: tuple[float, ...] = DEFAULT_NETWORK_GBIT
    task_cores: float | None = None

    def cores_for(self, model: "Model") -> float:
        cores = self.task_cores if self.task_cores is not None else model.profiles[0].cores
        if cores is None:
            raise UserError(f"report --view projection: the results of {model.profiles[0].run} record no "
                            f"environment.cores_available (a header written by hand or by an old version): give "
                            f"each task machine's cores with --task-cores N")
        return cores


@dataclass(frozen=True)
class Linear:
    """A per-step cost at P PS tasks: intercept + slope x P."""

    intercept: float
    slope: float

    def at(self, ps: int) -> float:
        return self.intercept + self.slope * ps


@dataclass
class Profiled:
    """One profiled PS cell's measured per-step costs (summed over the tasks of a kind)."""

    label: str
    run: str
    ps_tasks: int
    worker_tasks: int
    batch_size: int
    out_dim: int
    variant: str
    cores: float | None  # the profiled machine's cores (None: its header does not say)
    worker_ms: float
    ps_ms: float
    chief_ms: float
    ps_in: float  # bytes all PS tasks received per step
    ps_out: float  # bytes all PS tasks sent per step
    samples_per_sec: float | None = None  # the untraced steps the costs were read over


@dataclass
class Model:
    """Per-step costs as functions of P, for one family of cells (same layer, optimizer,
    batch and width), and where each came from."""

    family: dict[str, Any]
    profiles: list[Profiled]
    worker_ms: Linear
    ps_ms: Linear
    chief_ms: Linear
    fixed_in: float  # bytes per step each PS task receives whatever P is
    fixed_out: float
    entries_in: float  # bytes per step all PS tasks together receive for the batch's entries
    entries_out: float
    fitted: bool  # CPU fitted over several PS counts

    def bytes_per_ps(self, ps: int) -> tuple[float, float]:
        return self.fixed_in + self.entries_in / ps, self.fixed_out + self.entries_out / ps

    def bytes_per_worker(self, ps: int) -> tuple[float, float]:
        """(sent, received) by one worker per step of its own: what all PS tasks receive and send."""
        received_by_ps, sent_by_ps = self.bytes_per_ps(ps)
        return received_by_ps * ps, sent_by_ps * ps

    def cpu_ms(self, ps: int) -> tuple[float, float, float]:
        """(worker, all PS tasks, coordinator) CPU ms per step at `ps` tasks, kept above zero."""
        return tuple(max(f.at(ps), 1e-9) for f in (self.worker_ms, self.ps_ms, self.chief_ms))

    def bounds(self, ps: int, workers: int, gbit: float, cores: float) -> dict[str, float]:
        """Each bound on the cluster's steps per second."""
        link = gbit * 1e9 / 8.0  # bytes per second each way
        worker_ms, ps_ms, chief_ms = self.cpu_ms(ps)
        per_ps = max(self.bytes_per_ps(ps))
        per_worker = max(self.bytes_per_worker(ps))
        round_trip_ms = (worker_ms + ps_ms / ps) / cores + 1000.0 * per_worker / link
        return {
            "worker compute": workers * cores * 1000.0 / worker_ms,
            "PS compute": ps * cores * 1000.0 / ps_ms,
            "coordinator": 1000.0 / chief_ms,
            "PS network": _per_second(link, per_ps),
            "worker network": workers * _per_second(link, per_worker),
            "worker round trip": workers * 1000.0 / round_trip_ms,
        }

    def shared_bounds(self, ps: int, workers: int, cores: float) -> dict[str, float]:
        """Bounds for every task on one machine of `cores` cores, over loopback (whose
        cost is in the tasks' CPU time)."""
        worker_ms, ps_ms, chief_ms = self.cpu_ms(ps)
        return {
            "machine cores": cores * 1000.0 / (worker_ms + ps_ms + chief_ms),
            "coordinator": 1000.0 / chief_ms,
            "worker round trip": workers * cores * 1000.0 / (worker_ms + ps_ms / ps),
        }


def _per_second(capacity: float, cost: float) -> float:
    """How often a cost fits in a capacity; no bound (inf) from a cost of nothing."""
    return capacity / cost if cost > 0 else math.inf


def fixed_bytes_per_ps(variant: str, batch_size: int, out_dim: int) -> tuple[float, float]:
    """(in, out) bytes per step every PS task moves whatever the number of tasks: for the
    fused layout its output gradient and row counts in, its partial sum out (float32 and
    int32); for the stock layouts, whose traffic is rows of entries, none counted."""
    if variant == "fused_custom_op":
        return batch_size * out_dim * 4.0 + batch_size * 4.0, batch_size * out_dim * 4.0
    return 0.0, 0.0


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):  # numpy's too
        return None
    return float(value)


def _positive_int(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None and number >= 1 and number == int(number) else None


def profiled_cell(row: pd.Series, cores: float | None) -> Profiled | None:
    """A profiled local PS cell's costs; None where the record lacks them or holds ones no
    measurement gives (a remote cluster, a profile written before they were measured, a
    hand-edited file: no task counts, CPU times of zero or less, negative byte counts)."""
    shape = {key: _positive_int(row.get(key)) for key in ("ps_tasks", "worker_tasks", "batch_size", "out_dim")}
    if any(v is None for v in shape.values()):
        return None
    cluster = row.get("cluster")
    if isinstance(cluster, list):  # a merged record: one cluster per process; take the first measured
        cluster = next((c for c in cluster if isinstance(c, dict) and c.get("cpu_ms_per_step")), None)
    if not isinstance(cluster, dict) or row.get("strategy") != "parameter_server":
        return None
    cpu, traffic = cluster.get("cpu_ms_per_step"), cluster.get("ps_bytes_per_step")
    if not isinstance(cpu, dict) or not isinstance(traffic, dict) or not traffic:
        return None
    values = {task: _number(ms) for task, ms in cpu.items()}
    sums = {kind: sum(v for task, v in values.items() if task.startswith(kind + ":") and v is not None)
            for kind in ("ps", "worker")}
    directions = {kind: [_number(t.get(kind)) if isinstance(t, dict) else None for t in traffic.values()]
                  for kind in ("received", "sent")}
    if (any(v is None or v <= 0 for v in values.values()) or values.get("chief") is None or not sums["ps"]
            or not sums["worker"] or any(v is None or v < 0 for vs in directions.values() for v in vs)):
        return None
    costs = _number(cluster.get("costs_steps")), _number(cluster.get("costs_seconds"))
    rate = (costs[0] * shape["batch_size"] / costs[1]) if costs[0] and costs[1] and costs[1] > 0 else None
    return Profiled(
        label=str(row["label"]), run=str(row["run"]), ps_tasks=shape["ps_tasks"],
        worker_tasks=shape["worker_tasks"], batch_size=shape["batch_size"], out_dim=shape["out_dim"],
        variant=str(row["variant"]), cores=cores, worker_ms=sums["worker"], ps_ms=sums["ps"],
        chief_ms=values["chief"], ps_in=sum(directions["received"]), ps_out=sum(directions["sent"]),
        samples_per_sec=rate)


def _fit(points: list[tuple[int, float]]) -> Linear:
    """a + b x P through the points; a constant where they have one P."""
    ps = np.array([p for p, _ in points], float)
    ms = np.array([m for _, m in points], float)
    if len(set(ps)) < 2:
        return Linear(float(ms.mean()), 0.0)
    slope, intercept = np.polyfit(ps, ms, 1)
    return Linear(float(intercept), float(slope))


def build_model(family: dict[str, Any], profiles: list[Profiled]) -> Model:
    first = profiles[0]
    fixed_in, fixed_out = fixed_bytes_per_ps(first.variant, first.batch_size, first.out_dim)
    # The entries' part: what all PS tasks moved beyond the fixed part, averaged over profiles.
    entries_in = float(np.mean([p.ps_in - fixed_in * p.ps_tasks for p in profiles]))
    entries_out = float(np.mean([p.ps_out - fixed_out * p.ps_tasks for p in profiles]))
    fitted = len({p.ps_tasks for p in profiles}) > 1
    return Model(
        family=family, profiles=profiles,
        worker_ms=_fit([(p.ps_tasks, p.worker_ms) for p in profiles]),
        ps_ms=_fit([(p.ps_tasks, p.ps_ms) for p in profiles]),
        chief_ms=_fit([(p.ps_tasks, p.chief_ms) for p in profiles]),
        fixed_in=fixed_in, fixed_out=fixed_out, entries_in=max(entries_in, 0.0), entries_out=max(entries_out, 0.0),
        fitted=fitted)


def family_of(row: pd.Series) -> tuple:
    return tuple(row.get(key) for key in FAMILY)


def models_from(frame: pd.DataFrame, cores_by_run: dict[str, float | None]) -> list[Model]:
    """One model per family of profiled PS cells in `frame`."""
    groups: dict[tuple, list[Profiled]] = {}
    for _, row in frame[frame["profile"].notna()].iterrows():
        profiled = profiled_cell(row, cores_by_run.get(row["run"]))
        if profiled is not None:
            groups.setdefault(family_of(row), []).append(profiled)
    return [build_model(dict(zip(FAMILY, key)), profiles) for key, profiles in groups.items()]


def _bottleneck(bounds: dict[str, float]) -> tuple[str, float, str, float]:
    ordered = sorted(bounds.items(), key=lambda kv: kv[1])
    (name, steps), (second, second_steps) = ordered[0], ordered[1]
    return name, steps, second, second_steps


def _model_name(model: Model) -> str:
    f = model.family
    return f"{f['variant']} {f['optimizer']} b{f['batch_size']} out{f['out_dim']}"


def validation_rows(model: Model, frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The family's measured (not profiled) PS cells of the profiled machine, predicted with
    every task on that machine's cores."""
    measured = frame[frame["profile"].isna() & (frame["strategy"] == "parameter_server")
                     & (frame["status"] == "ok") & frame["samples_per_sec"].notna()]
    rows = []
    cores = model.profiles[0].cores
    for _, row in measured.iterrows():
        ps, workers, actual = _positive_int(row.get("ps_tasks")), _positive_int(row.get("worker_tasks")), _number(
            row.get("samples_per_sec"))
        if (family_of(row) != tuple(model.family.values()) or cores is None or ps is None or workers is None
                or actual is None or actual <= 0):
            continue  # nothing to check the prediction against
        bounds = model.shared_bounds(ps, workers, cores)
        name, steps, second, second_steps = _bottleneck(bounds)
        predicted = steps * float(row["batch_size"])
        rows.append({"model": _model_name(model), "cell": row["label"], "ps": ps,
                     "workers": workers, "network": "loopback, shared cores",
                     "samples_per_sec": predicted, "bottleneck": name, "next_bound": second,
                     "next_bound_samples_per_sec": second_steps * float(row["batch_size"]),
                     "measured_samples_per_sec": actual, "error_pct": 100.0 * (predicted / actual - 1.0)})
    return rows


def forecast_rows(model: Model, settings: Settings) -> list[dict[str, Any]]:
    batch = float(model.family["batch_size"])
    cores = settings.cores_for(model)
    rows = []
    for gbit in settings.network_gbit:
        for ps in settings.ps:
            for workers in settings.workers:
                bounds = model.bounds(ps, workers, gbit, cores)
                name, steps, second, second_steps = _bottleneck(bounds)
                rows.append({"model": _model_name(model), "cell": "", "ps": ps, "workers": workers,
                             "network": f"{gbit:g} Gbit/s", "samples_per_sec": steps * batch, "bottleneck": name,
                             "next_bound": second, "next_bound_samples_per_sec": second_steps * batch,
                             "measured_samples_per_sec": None, "error_pct": None})
    return rows


def figures_note(model: Model, settings: Settings) -> str:
    """The measured figures and the assumptions one model rests on."""
    def ms(f: Linear) -> str:
        return f"{f.intercept:.2f} ms" if f.slope == 0 else f"{f.intercept:.2f} + {f.slope:.2f} x P ms"

    profiles = "; ".join(
        f"{p.label} ({p.run}, {p.ps_tasks} PS x {p.worker_tasks} workers): CPU per step worker {p.worker_ms:.2f} ms, "
        f"PS {p.ps_ms:.2f} ms, coordinator {p.chief_ms:.2f} ms; PS bytes per step {p.ps_in / 1e3:.1f} KB in, "
        f"{p.ps_out / 1e3:.1f} KB out" + (f"; {sig3(p.samples_per_sec)} samples/s while measured"
                                          if p.samples_per_sec else "")
        for p in model.profiles)
    cpu = (f"CPU per step fitted over {len({p.ps_tasks for p in model.profiles})} PS counts: worker "
           f"{ms(model.worker_ms)}, PS (all tasks) {ms(model.ps_ms)}, coordinator {ms(model.chief_ms)}"
           if model.fitted else
           "one PS count profiled: all PS CPU taken to divide evenly over the tasks, worker and coordinator CPU "
           "per step taken not to change with P (profile at two PS counts to fit how they do)")
    cores = settings.cores_for(model)
    return (f"{_model_name(model)} rests on: {profiles}. Bytes per PS task at P tasks: "
            f"{model.fixed_in / 1e3:.1f} KB in + {model.entries_in / 1e3:.1f} KB / P, "
            f"{model.fixed_out / 1e3:.1f} KB out + {model.entries_out / 1e3:.1f} KB / P "
            f"(fixed part from the layout's [batch, out_dim] tensors). {cpu}. "
            f"Each task machine: {cores:g} cores ({'--task-cores' if settings.task_cores is not None else 'the profiled machine'}'s).")


def projection(frame: pd.DataFrame, cores_by_run: dict[str, float | None], settings: Settings) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows, notes) of the projection view: validation rows first, then the forecasts."""
    models = models_from(frame, cores_by_run)
    if not models:
        raise UserError("report --view projection: these results hold no profiled parameter-server cell with "
                        "per-task CPU time and bytes per step (records with CPU times of zero or less, negative byte counts or no "
                        "task counts are left out); write them with `sparsebench profile --suite "
                        "distributed --set strategy=parameter_server` (a local cluster, this version or later)")
    rows, notes = [], []
    for model in models:
        rows += validation_rows(model, frame)
    for model in models:
        rows += forecast_rows(model, settings)
        notes.append(figures_note(model, settings))
    checked = [r for r in rows if r["error_pct"] is not None]
    if checked:
        errors = ", ".join(f"{r['cell']} {r['error_pct']:+.1f}%" for r in checked)
        notes.insert(0, f"check on the profiled machine (loopback, every task sharing its cores): predicted against "
                        f"measured samples/s: {errors}")
    notes += [
        "bounds on the cluster's steps/s: worker compute (W x cores / worker CPU per step), PS compute (P x cores / "
        "PS CPU per step), coordinator (one core / its CPU per step), PS network (link / one PS task's bytes per step, "
        "the larger direction), worker network, worker round trip (a worker's CPU and its wait for its share of PS CPU, each "
        "on its task's cores, and the transfer, one after another); the forecast is the tightest, named as the bottleneck",
        "what it leaves out: network latency and switch limits, staleness of asynchronous updates, stragglers, "
        "CPU that grows with concurrent workers on one PS (contention); treat the forecast as an upper bound",
    ]
    return rows, notes


def parse_counts(text: str | None, default: tuple, what: str, kind=int) -> tuple:
    """`--ps 4,8,16` -> (4, 8, 16); one clear error for anything else."""
    if text is None:
        return default
    try:
        values = tuple(kind(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserError(f"report --view projection: --{what} {text!r}: give positive numbers separated by commas") from None
    if not values or any(v <= 0 or not math.isfinite(v) for v in values):
        raise UserError(f"report --view projection: --{what} {text!r}: give positive numbers separated by commas")
    return values
