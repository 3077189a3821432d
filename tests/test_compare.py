"""`sparsebench compare` on hand-made results files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.make_fixtures import cell, environment, failed, ok, write_to

from sparsebench import stats
from sparsebench.record import Record

ROOT = Path(__file__).resolve().parent.parent
SUITE = "smoke"
TIGHT = [10000.0, 10100.0, 9900.0, 10050.0, 9950.0, 10020.0, 9980.0, 10070.0]


def cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "sparsebench", *args], capture_output=True, text=True, env=env)


def run_file(tmp_path, name, cells_windows, env=None, extra=()):
    path = tmp_path / f"{name}.jsonl"
    records = [ok(cell(SUITE, variant, 256), windows) for variant, windows in cells_windows] + list(extra)
    write_to(path, records, SUITE, env)
    return path


def test_a_clear_30_percent_slowdown_with_tight_windows_is_flagged_beyond_the_noise_factor(tmp_path):
    """One process per cell: its windows cannot show run-to-run noise, so a -30% change is
    flagged only when the noise factor allows it."""
    base = run_file(tmp_path, "base", [("embedding_lookup_sparse", TIGHT), ("sparse_dense_matmul", TIGHT)])
    cur = run_file(tmp_path, "cur", [("embedding_lookup_sparse", [w * 0.7 for w in TIGHT]),
                                     ("sparse_dense_matmul", TIGHT)])
    done = cli("compare", str(base), str(cur), "--noise-factor", "1.2")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "REGRESSED" in done.stdout and "-30.0%" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "2 cells compared, 1 regressed, 0 improved, 1 unchanged"
    done = cli("compare", str(base), str(cur))  # the default: a one-process cell must halve or double
    assert done.returncode == 0 and "REGRESSED" not in done.stdout
    assert "run-to-run noise unknown" in done.stdout and "change 2x beyond the shared shift" in done.stdout


def test_a_30_percent_difference_of_means_with_overlapping_windows_is_not(tmp_path):
    noisy = [5000.0, 15000.0, 8000.0, 12000.0, 6000.0, 14000.0, 9000.0, 11000.0]  # mean 10,000
    slower = [4000.0, 13500.0, 3000.0, 9000.0, 2500.0, 12500.0, 5000.0, 6500.0]  # mean 7,000: -30%
    base = run_file(tmp_path, "base", [("embedding_lookup_sparse", noisy)])
    cur = run_file(tmp_path, "cur", [("embedding_lookup_sparse", slower)])
    assert sum(slower) / sum(noisy) == pytest.approx(0.7)
    done = cli("compare", str(base), str(cur), "--format", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    payload = json.loads(done.stdout)
    (c,) = payload["cells"]
    assert c["status"] == "unchanged" and c["ratio"] < 0.9 and c["p_value"] > 0.01


def test_an_improvement_is_reported_as_such(tmp_path):
    base = run_file(tmp_path, "base", [("embedding_lookup_sparse", TIGHT)])
    cur = run_file(tmp_path, "cur", [("embedding_lookup_sparse", [w * 1.5 for w in TIGHT])])
    done = cli("compare", str(base), str(cur), "--format", "markdown", "--noise-factor", "1.2")
    assert done.returncode == 0
    assert "IMPROVED" in done.stdout and "+50.0%" in done.stdout
    assert done.stdout.strip().endswith("1 cells compared, 0 regressed, 1 improved, 0 unchanged")


def test_missing_and_failed_cells_are_listed_not_dropped(tmp_path):
    base = run_file(tmp_path, "base", [("embedding_lookup_sparse", TIGHT), ("sparse_dense_matmul", TIGHT),
                                       ("row_partitioned", TIGHT)])
    cur = run_file(tmp_path, "cur", [("embedding_lookup_sparse", TIGHT), ("col_partitioned", TIGHT)],
                   extra=[failed(cell(SUITE, "sparse_dense_matmul", 256), "ValueError: boom")])
    done = cli("compare", str(base), str(cur))
    assert done.returncode == 1  # the current side failed a cell the baseline measured
    assert "only in baseline: row-mod1-b256-sgd-cpu" in done.stdout
    assert "only in current: col-x1-b256-sgd-cpu" in done.stdout
    assert "FAILED" in done.stdout and "current failed (ValueError: boom); the baseline measured it" in done.stdout
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("1 cells compared") and "1 FAILED in current: sdm-b256-sgd-cpu" in last


def test_a_cell_only_the_baseline_failed_is_reported_not_a_regression(tmp_path):
    base = run_file(tmp_path, "base", [("embedding_lookup_sparse", TIGHT)],
                    extra=[failed(cell(SUITE, "sparse_dense_matmul", 256), "ValueError: old bug")])
    cur = run_file(tmp_path, "cur", [("embedding_lookup_sparse", TIGHT), ("sparse_dense_matmul", TIGHT)])
    done = cli("compare", str(base), str(cur), "--format", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    by_status = {c["cell_id"].split("-")[0]: c for c in json.loads(done.stdout)["cells"]}
    assert by_status["sdm"]["status"] == "not compared" and "baseline failed" in by_status["sdm"]["note"]
    assert json.loads(done.stdout)["failed"] == 0


def test_a_process_of_the_current_side_that_crashed_fails_the_gate(tmp_path):
    """Merged, a cell with one failed process of three stays ok; the gate still sees the crash."""
    c = cell(SUITE, "embedding_lookup_sparse", 256)
    base = tmp_path / "base.jsonl"
    write_to(base, [ok(c, TIGHT, round=r) for r in (1, 2, 3)], SUITE)
    crashed = Record.new(c, 2, "failed", "worker killed by SIGSEGV")
    write_to(tmp_path / "cur.jsonl", [ok(c, TIGHT, round=1), crashed, ok(c, TIGHT, round=3)], SUITE)
    done = cli("compare", str(base), str(tmp_path / "cur.jsonl"))
    assert done.returncode == 1 and "1 of 3 processes not ok (round 2: failed, worker killed by SIGSEGV)" in done.stdout


def test_schema_mismatch_and_missing_file_exit_2(tmp_path):
    base = run_file(tmp_path, "base", [("embedding_lookup_sparse", TIGHT)])
    lines = base.read_text().splitlines()
    header = json.loads(lines[0])
    header["version"] = 99
    future = tmp_path / "future.jsonl"
    future.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    done = cli("compare", str(base), str(future))
    assert done.returncode == 2 and "results format version 99" in done.stderr and "Traceback" not in done.stderr
    done = cli("compare", str(base), str(tmp_path / "nope.jsonl"))
    assert done.returncode == 2 and "no such results file" in done.stderr
    other = run_file(tmp_path, "other", [("col_partitioned", TIGHT)])
    done = cli("compare", str(base), str(other))
    assert done.returncode == 2 and "no cell in common" in done.stderr


def test_fingerprint_mismatch_warns_loudly_and_strict_env_refuses(tmp_path):
    base = run_file(tmp_path, "base", [("embedding_lookup_sparse", TIGHT)])
    cur = run_file(tmp_path, "cur", [("embedding_lookup_sparse", TIGHT)], env=environment(cpu="Other CPU", cores=8))
    done = cli("compare", str(base), str(cur))
    assert done.returncode == 0
    first = done.stdout.splitlines()[0]
    assert first.startswith("WARNING: environment CPU model differs") and "measures the machine" in first
    assert "cores available differs" in done.stdout
    done = cli("compare", str(base), str(cur), "--strict-env")
    assert done.returncode == 2 and "--strict-env" in done.stderr


def test_underpowered_comparisons_are_warned_about(tmp_path):
    base = run_file(tmp_path, "base", [("embedding_lookup_sparse", TIGHT[:3])])
    cur = run_file(tmp_path, "cur", [("embedding_lookup_sparse", [w * 0.5 for w in TIGHT[:3]])])
    done = cli("compare", str(base), str(cur))
    assert done.returncode == 0  # 3 vs 3 windows can never be significant at 0.01 ...
    assert "with 3 and 3 windows the U test cannot reach p < 0.01" in done.stdout  # ... and it says so


def test_github_benchmark_output(tmp_path):
    base = run_file(tmp_path, "base", [("embedding_lookup_sparse", TIGHT)])
    out = tmp_path / "gh.json"
    assert cli("compare", str(base), str(base), "--github-benchmark", str(out)).returncode == 0
    (entry,) = json.loads(out.read_text())
    assert entry["name"] == "els-b256-sgd-cpu-" + entry["name"].rsplit("-", 1)[1]
    assert entry["unit"] == "samples/s" and entry["value"] == pytest.approx(10010.0)


def test_mann_whitney_exact_p_values_counted_by_hand():
    # Every ordering of 3 vs 3 values is equally likely: C(6, 3) = 20 of them; complete
    # separation is 1 ordering per side, so the two-sided p is 2 / 20.
    assert stats.mann_whitney_p([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1)
    assert stats.mann_whitney_p([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]) == pytest.approx(2 / 252)
    assert stats.mann_whitney_min_p(5, 5) == pytest.approx(2 / 252)
    assert stats.mann_whitney_p([5.0, 5.0], [5.0, 5.0]) == 1.0


def _strict_json(text):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_a_cell_without_a_usable_median_is_not_compared_and_json_stays_json(tmp_path):
    base = run_file(tmp_path, "base", [("embedding_lookup_sparse", [0.0] * 8), ("sparse_dense_matmul", TIGHT)])
    cur = run_file(tmp_path, "cur", [("embedding_lookup_sparse", TIGHT), ("sparse_dense_matmul", TIGHT)])
    done = cli("compare", str(base), str(cur), "--format", "json")
    assert done.returncode == 0, done.stderr
    payload = _strict_json(done.stdout)  # no NaN or Infinity anywhere
    by_status = {c["cell_id"].split("-")[0]: c for c in payload["cells"]}
    assert by_status["els"]["status"] == "not compared" and "no usable median" in by_status["els"]["note"]
    assert by_status["sdm"]["status"] == "unchanged"
    assert payload["summary"] == "1 cells compared, 0 regressed, 0 improved, 1 unchanged"
