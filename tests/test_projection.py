"""`report --view projection`: the bounds, the fit over PS counts, the check on the profiled
machine, and the figures it gives on a committed profile of the distributed suite."""

import json
from pathlib import Path

import pytest

from sparsebench.analyze.projection import Linear, Profiled, Settings, build_model, fixed_bytes_per_ps
from sparsebench.cli import main

FIXTURES = Path(__file__).parent / "fixtures"
PROFILE = FIXTURES / "distributed-profile-ps1.jsonl"  # `profile --suite distributed --set strategy=parameter_server --set ps_tasks=1 --steps 100`
PROFILE2 = FIXTURES / "distributed-profile-ps2.jsonl"  # the same with ps_tasks=2
MEASURED = FIXTURES / "distributed-ps-run.jsonl"  # `run --suite distributed --set strategy=parameter_server`, same commit


def profiled(ps_tasks=1, ps_ms=20.0, worker_ms=10.0, chief_ms=1.0, ps_in=12400.0, ps_out=6000.0, variant="fused_custom_op"):
    return Profiled(label=f"c-ps{ps_tasks}", run="r", ps_tasks=ps_tasks, worker_tasks=2, batch_size=100, out_dim=10,
                    variant=variant, cores=2.0, worker_ms=worker_ms, ps_ms=ps_ms, chief_ms=chief_ms, ps_in=ps_in,
                    ps_out=ps_out)


FAMILY = {"variant": "fused_custom_op", "partition_strategy": None, "optimizer": "sgd", "batch_size": 100, "out_dim": 10}


def test_each_bound_is_the_per_step_cost_against_what_the_cluster_supplies():
    model = build_model(FAMILY, [profiled()])
    # Fused layout, batch 100 x 10 outputs: 4000 B of gradient + 400 B of row counts in, 4000 B of partial sum out,
    # whatever P; the rest of the measured bytes are the entries, divided over the PS tasks.
    assert (model.fixed_in, model.fixed_out) == (4400.0, 4000.0)
    assert (model.entries_in, model.entries_out) == (8000.0, 2000.0)
    assert model.bytes_per_ps(4) == (6400.0, 4500.0)
    bounds = model.bounds(ps=4, workers=8, gbit=1.0, cores=2.0)  # a link of 125e6 bytes/s
    assert bounds["worker compute"] == pytest.approx(8 * 2 * 1000 / 10)
    assert bounds["PS compute"] == pytest.approx(4 * 2 * 1000 / 20)
    assert bounds["coordinator"] == pytest.approx(1000.0)
    assert bounds["PS network"] == pytest.approx(125e6 / 6400)
    assert bounds["worker network"] == pytest.approx(8 * 125e6 / (6400 * 4))
    assert bounds["worker round trip"] == pytest.approx(8 * 1000 / ((10 + 20 / 4) / 2 + 1000 * 25600 / 125e6))
    assert min(bounds, key=bounds.get) == "PS compute"
    slow = model.bounds(ps=4, workers=8, gbit=0.01, cores=2.0)
    assert min(slow, key=slow.get) == "PS network"
    shared = model.shared_bounds(ps=1, workers=2, cores=2.0)
    assert shared["machine cores"] == pytest.approx(2 * 1000 / (10 + 20 + 1))
    assert shared["worker round trip"] == pytest.approx(2 * 2 * 1000 / (10 + 20))


def test_cpu_is_fitted_over_ps_counts_when_two_are_profiled_and_split_evenly_when_one_is():
    one = build_model(FAMILY, [profiled()])
    assert not one.fitted and one.ps_ms == Linear(20.0, 0.0)
    two = build_model(FAMILY, [profiled(1, ps_ms=20.0, worker_ms=10.0), profiled(2, ps_ms=24.0, worker_ms=11.0,
                                                                                 ps_in=4400 * 2 + 8000, ps_out=4000 * 2 + 2000)])
    assert two.fitted
    assert two.ps_ms.at(4) == pytest.approx(32.0) and two.worker_ms.at(4) == pytest.approx(13.0)
    assert two.bounds(4, 8, 100.0, 2.0)["PS compute"] == pytest.approx(4 * 2 * 1000 / 32)
    assert (two.entries_in, two.entries_out) == (8000.0, 2000.0)


def test_stock_layouts_have_no_fixed_bytes_per_ps_task():
    assert fixed_bytes_per_ps("row_partitioned", 1024, 50) == (0.0, 0.0)
    assert fixed_bytes_per_ps("fused_custom_op", 1024, 50) == (1024 * 50 * 4 + 1024 * 4, 1024 * 50 * 4)


def sparsebench(capsys, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the command line, run in this process."""
    with pytest.raises(SystemExit) as done:
        main(list(args))
    out = capsys.readouterr()
    return done.value.code, out.out, out.err


def _projection_json(capsys, *args: str) -> dict:
    code, out, err = sparsebench(capsys, "report", str(PROFILE), *args, "--view", "projection", "--format", "json")
    assert code == 0, err
    return json.loads(out)


def _by(rows, **where):
    found = [r for r in rows if all(r[k] == v for k, v in where.items())]
    assert len(found) == 1, (where, found)
    return found[0]


def test_the_committed_profile_gives_the_documented_forecast(capsys):
    """README ("Forecasting larger clusters") quotes these figures of the committed 1- and
    2-PS profiles (CPU fitted over the two PS counts)."""
    rows = _projection_json(capsys, str(PROFILE2), "--ps", "4,16", "--workers", "4,64", "--network", "10,25")["rows"]
    fused = "fused_custom_op sgd b1024 out50"
    small = _by(rows, model=fused, ps=4, workers=4, network="10 Gbit/s")
    big = _by(rows, model=fused, ps=16, workers=64, network="25 Gbit/s")
    stock = _by(rows, model="col_partitioned sgd b1024 out50", ps=16, workers=64, network="10 Gbit/s")
    assert (round(small["samples_per_sec"], -2), small["bottleneck"]) == DOCUMENTED["fused 4x4 10G"]
    assert (round(big["samples_per_sec"], -2), big["bottleneck"]) == DOCUMENTED["fused 16x64 25G"]
    assert (round(stock["samples_per_sec"], -2), stock["bottleneck"]) == DOCUMENTED["col 16x64 10G"]


def test_the_check_on_the_profiled_machine_predicts_its_measured_cells(capsys):
    """With the run beside the profile, every measured PS cell of a profiled family gets a
    prediction with all tasks on the machine's cores, and its error against the measurement."""
    result = _projection_json(capsys, str(MEASURED), "--ps", "4", "--workers", "4", "--network", "10")
    checked = [r for r in result["rows"] if r["error_pct"] is not None]
    assert len(checked) == 12  # 3 layouts x 2 optimizers x 1 and 2 PS tasks
    for row in checked:
        assert row["network"] == "loopback, shared cores"
        assert row["error_pct"] == pytest.approx(100 * (row["samples_per_sec"] / row["measured_samples_per_sec"] - 1))
    assert result["notes"][0].startswith("check on the profiled machine")
    fused = _by(checked, cell="fused-b1024-sgd-cpu-ps1w2")
    assert round(fused["error_pct"], 1) == DOCUMENTED["fused ps1w2 error"]


def test_every_figure_the_forecast_rests_on_is_named(capsys):
    code, out, err = sparsebench(capsys, "report", str(PROFILE), "--view", "projection", "--ps", "8", "--workers", "16")
    assert code == 0, err
    assert "fused-b1024-sgd-cpu-ps1w2" in out and "coordinator" in out
    assert "one PS count profiled" in out  # the assumption one profile forces
    assert "Each task machine: 2 cores (the profiled machine's)" in out
    code, out, err = sparsebench(capsys, "report", str(PROFILE), "--view", "projection", "--task-cores", "16")
    assert code == 0 and "16 cores (--task-cores's)" in out


@pytest.mark.parametrize("args, says", [
    (["--view", "projection", "--ps", "4,x"], "--ps '4,x': give positive numbers"),
    (["--view", "projection", "--network", "0"], "--network '0': give positive numbers"),
    (["--view", "traffic", "--network", "10"], "belong to --view projection"),
])
def test_bad_projection_options_are_one_line_errors(capsys, args, says):
    code, out, err = sparsebench(capsys, "report", str(PROFILE), *args)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err


def test_results_without_a_profiled_ps_cell_are_refused_by_name(capsys):
    code, out, err = sparsebench(capsys, "report", str(MEASURED), "--view", "projection")
    assert code == 2 and "no profiled parameter-server cell with per-task CPU time" in err, err


DOCUMENTED = {  # from the committed fixtures; README quotes the same figures
    "fused 4x4 10G": (225700.0, "PS compute"),
    "fused 16x64 25G": (307700.0, "PS compute"),
    "col 16x64 10G": (173700.0, "PS compute"),
    "fused ps1w2 error": 14.4,
}


def _edited(tmp_path, source: Path, header=lambda h: None, record=lambda r: None) -> Path:
    """A copy of a committed results file with its header and each record edited in place."""
    lines = [json.loads(line) for line in source.read_text().splitlines()]
    header(lines[0])
    for line in lines[1:]:
        record(line)
    path = tmp_path / source.name
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _set_bytes(value):
    def edit(record):
        for task in (record.get("cluster") or {}).get("ps_bytes_per_step") or {}:
            record["cluster"]["ps_bytes_per_step"][task] = {"sent": value, "received": value}
    return edit


@pytest.mark.parametrize("view", ["projection", "traffic"])
@pytest.mark.parametrize("what, edit", [
    ("zero bytes", _set_bytes(0)),
    ("negative bytes", _set_bytes(-5)),
    ("zero CPU", lambda r: r.get("cluster") and r["cluster"]["cpu_ms_per_step"].update({"ps:0": 0.0})),
    ("no ps_tasks", lambda r: r.get("axes", {}).pop("ps_tasks", None)),
])
def test_records_no_measurement_gives_are_left_out_never_divided_by(capsys, tmp_path, view, what, edit):
    """Zero or negative byte counts, CPU times of zero and records without ps_tasks crashed
    projection and traffic (ZeroDivisionError, int(None)) or were printed as data."""
    path = _edited(tmp_path, PROFILE, record=edit)
    code, out, err = sparsebench(capsys, "report", str(path), "--view", view)
    assert "Traceback" not in out + err
    assert code in (0, 2) and (code == 0 or len(err.strip().splitlines()) == 1), err
    assert "-5" not in out and "-10 B" not in out


def test_a_measured_cell_with_rate_zero_is_not_checked_against(capsys, tmp_path):
    def stalled(record):
        if record.get("windows"):
            record.update(samples_per_sec=0.0, samples_per_sec_low=0.0, samples_per_sec_high=0.0,
                          windows=[0.0] * len(record["windows"]))

    measured = _edited(tmp_path, MEASURED, record=stalled)
    code, out, err = sparsebench(capsys, "report", str(PROFILE), str(measured), "--view", "projection",
                                 "--format", "json")
    assert code == 0, err
    assert all(row["error_pct"] is None for row in json.loads(out)["rows"])


def test_a_header_without_cores_asks_for_task_cores_and_takes_them(capsys, tmp_path):
    """It said there was "no profiled parameter-server cell" when the header lacked cores."""
    path = _edited(tmp_path, PROFILE, header=lambda h: h["environment"].pop("cores_available"))
    code, out, err = sparsebench(capsys, "report", str(path), "--view", "projection")
    assert code == 2 and "record no environment.cores_available" in err and "--task-cores" in err, err
    code, out, err = sparsebench(capsys, "report", str(path), "--view", "projection", "--task-cores", "8")
    assert code == 0 and "8 cores (--task-cores's)" in out, err
