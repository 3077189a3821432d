"""`sparsebench profile` on a tiny cell: op table, shares, trace, TensorBoard layout, report."""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsebench.train.measure import profiler

pytestmark = pytest.mark.slow

TINY = Path(__file__).parent / "fixtures" / "tiny.toml"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("prof") / "p"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "sparsebench", "profile", "--suite", str(TINY), "--steps", "5", "--output", str(out),
         "--set", "variant=sparse_dense_matmul,embedding_lookup_sparse"],
        capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return out, done.stdout


def cell_dirs(out):
    return sorted(p for p in out.iterdir() if p.is_dir())


def test_op_table_counts_calls_per_step_by_phase(profiled):
    out, _ = profiled
    dirs = cell_dirs(out)
    assert len(dirs) == 2
    for folder in dirs:
        summary = json.loads((folder / "ops.json").read_text())
        assert summary["steps"] == 5 and summary["ops"]
        assert summary["op_ms_per_step"] > 0 and summary["step_wall_ms"] > 0
        calls = {(op["op_type"], op["phase"]): op["calls_per_step"] for op in summary["ops"]}
        # One normalization update per step, in the forward pass: per-step division and
        # phase attribution are both right, or this is not 1.0.
        assert calls[("ResourceScatterMax", "forward")] == pytest.approx(1.0)
        if summary["cell_id"].startswith("sdm-"):
            assert calls[("SparseTensorDenseMatMul", "forward")] == pytest.approx(1.0)
            assert calls[("ResourceApplyGradientDescent", "optimizer")] >= 1.0
        phases = summary["phases_ms_per_step"]
        assert phases["forward"] > 0 and phases["backward"] > 0 and phases["optimizer"] > 0
        assert (folder / "ops.csv").read_text().startswith("op_type,phase,ms_per_step,share_pct,calls_per_step")
        assert glob.glob(str(folder / "plugins" / "profile" / "*" / "*.xplane.pb"))  # TensorBoard's layout


def test_trace_is_chrome_trace_json(profiled):
    out, _ = profiled
    trace = json.loads((cell_dirs(out)[0] / "trace.json").read_text())
    complete = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    assert complete and all({"name", "ts", "dur", "pid", "tid"} <= set(e) for e in complete)


def test_the_variants_show_their_signature_ops(profiled):
    out, stdout = profiled
    ops = {}
    for folder in cell_dirs(out):
        summary = json.loads((folder / "ops.json").read_text())
        ops[summary["cell_id"].split("-")[0]] = {op["op_type"] for op in summary["ops"]}
        assert not {"Process", "ParallelFor", "Record"} & ops[summary["cell_id"].split("-")[0]]
    assert "SparseTensorDenseMatMul" in ops["sdm"] and "ResourceApplyGradientDescent" in ops["sdm"]
    assert "SparseTensorDenseMatMul" not in ops["els"]
    assert {"ResourceGather", "ResourceScatterSub"} <= ops["els"]
    assert "vs first cell" in stdout and "by phase:" in stdout  # the side-by-side table was printed


def test_report_shows_the_op_tables_and_the_stacked_bars(profiled, tmp_path):
    out, _ = profiled
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "sparsebench", "report", str(out / "results.jsonl"),
                           "--plots", str(tmp_path)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "Where each step's time goes" in done.stdout and "SparseTensorDenseMatMul" in done.stdout
    assert (tmp_path / "step_time_by_op_category.png").stat().st_size > 1000


def test_only_op_events_count():
    assert profiler.is_op_event("forward/MatMul:_MklMatMul")
    assert not profiler.is_op_event("ExecutorState::Process")
    assert not profiler.is_op_event("ParallelFor")


def test_phase_of_names():
    assert profiler.phase_of("gradient_tape/forward/dense/MatMul") == "backward"
    assert profiler.phase_of("optimizer/ResourceScatterSub") == "optimizer"
    assert profiler.phase_of("forward/sparse_model/SparseTensorDenseMatMul") == "forward"
    assert profiler.phase_of("Identity") == "other"


def test_op_table_arithmetic_on_hand_made_events():
    events = [
        {"node": "forward/a/MatMul", "op_type": "MatMul", "dur_us": 300.0},
        {"node": "forward/b/MatMul", "op_type": "MatMul", "dur_us": 100.0},
        {"node": "gradient_tape/forward/a/MatMul", "op_type": "MatMul", "dur_us": 200.0},
        {"node": "optimizer/ResourceScatterSub", "op_type": "ResourceScatterSub", "dur_us": 400.0},
    ]
    rows = {(r.op_type, r.phase): r for r in profiler.op_table(events, steps=2)}
    forward = rows[("MatMul", "forward")]
    assert forward.ms_per_step == pytest.approx(0.2) and forward.calls_per_step == 1.0
    assert forward.share_pct == pytest.approx(40.0) and forward.category == "dense matmul"
    assert rows[("MatMul", "backward")].ms_per_step == pytest.approx(0.1)
    assert rows[("ResourceScatterSub", "optimizer")].share_pct == pytest.approx(40.0)
    table = profiler.op_table(events, steps=2)
    assert [r.ms_per_step for r in table] == sorted((r.ms_per_step for r in table), reverse=True)
