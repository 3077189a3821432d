"""`sparsebench run` end to end with real worker processes on tiny cells.

Covers: records for every cell, SIGKILL of a worker, per-cell timeouts, Ctrl-C then
--resume, thread settings in effect, a GPU cell without a GPU, and exit codes.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sparsebench.execute.orchestrator import Orchestrator
from sparsebench.plan.suite import load_suite
from sparsebench.results import read_results

pytestmark = pytest.mark.slow

TINY = Path(__file__).parent / "fixtures" / "tiny.toml"
ROOT = Path(__file__).resolve().parent.parent


def cli(*args, check=None, env=None, **kwargs):
    env = env or {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "sparsebench", *args], capture_output=True, text=True, env=env, **kwargs)
    if check is not None:
        assert done.returncode == check, done.stdout + done.stderr
    return done


def tiny_cells(*overrides):
    suite = load_suite(str(TINY))
    for o in overrides:
        suite.override(o)
    return suite.cells()


def test_run_records_every_cell_with_windows_and_metrics(tmp_path):
    out = tmp_path / "r.jsonl"
    done = cli("run", "--suite", str(TINY), "--output", str(out), "--set", "optimizer=sgd,lazy_adam", check=0)
    assert "4 cells run: 4 ok" in done.stdout
    results = read_results(out)
    assert results.header["run"]["suite"] == "tiny"
    assert results.header["environment"]["tensorflow"]["version"].startswith("2.")
    assert len(results.records) == 4
    for record in results.records:
        assert record.status == "ok"
        assert len(record.windows) == 3 and all(w > 0 for w in record.windows)
        assert record.samples_per_sec_low <= record.samples_per_sec <= record.samples_per_sec_high
        assert record.step_ms_p50 <= record.step_ms_p99
        assert 0.0 <= record.auc <= 1.0 and record.loss > 0 and record.peak_rss_mb > 0
        assert record.isolation == "cell"
        expected = "dense" if record.axes["variant"] == "sparse_dense_matmul" else "IndexedSlices"
        assert record.grad_type == expected and record.rows_touched > 0
        assert record.nonfinite_inputs == 0
        if results.header["run"]["custom_op"]["ok"]:  # the bound's replay is in the op library
            assert record.bound_samples_per_sec > 0 and len(record.bound_windows) >= 3
            assert record.bound_share == pytest.approx(record.samples_per_sec / record.bound_samples_per_sec)
            assert record.phases["bound_s"] > 0
        else:
            assert record.bound_reason.startswith("custom op unavailable")
    pids = {r.worker["pid"] for r in results.records}
    assert len(pids) == 4  # one process per cell
    report = json.loads(cli("report", str(out), "--format", "json", check=0).stdout)
    assert len(report) == 4 and {"cell_id", "samples_per_sec", "windows", "grad_type", "rows_touched",
                                 "bound_samples_per_sec", "bound_share", "nonfinite_inputs"} <= set(report[0])


def test_off_a_terminal_the_run_beats_and_names_phases_and_v_streams_the_worker_log(tmp_path):
    """A CI log sees life while a cell runs: heartbeat lines naming the cell and what its
    worker does, and under -v the worker's own lines (its start-up line on any machine;
    TensorFlow's messages where it prints them)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SPARSEBENCH_HEARTBEAT_S": "0.2", "TF_CPP_MIN_LOG_LEVEL": "0"}
    out = tmp_path / "r.jsonl"
    done = cli("run", "--suite", str(TINY), "--output", str(out), "-v", env=env, check=0, timeout=600)
    beats = [line for line in done.stderr.splitlines() if line.startswith("... ")]
    assert beats and all(" running " in b for b in beats), done.stderr
    phases = ("starting the worker (importing TensorFlow)", "preparing data and model", "quality:", "warm-up:",
              "timing ", "memory bound:")
    assert any(p in b for b in beats for p in phases), beats
    assert any(line.startswith("  worker | worker ") and "TensorFlow" in line and "imported in" in line
               for line in done.stderr.splitlines()), done.stderr
    assert "custom op: building the fused op library" in done.stderr  # the compile is named before it runs
    quiet = cli("run", "--suite", str(TINY), "--output", str(tmp_path / "q.jsonl"), "--quiet", env=env, check=0,
                timeout=600)
    assert not any(line.startswith(("... ", "  worker | ")) for line in quiet.stderr.splitlines()), quiet.stderr


def test_sigkilled_worker_is_a_failed_record_and_later_cells_still_run():
    cells = tiny_cells()
    records = []
    orchestrator = None

    def on_start(cell):
        if cell is cells[0]:
            time.sleep(1.0)  # let the worker get going, then kill it hard
            os.kill(orchestrator._process.pid, signal.SIGKILL)

    orchestrator = Orchestrator(record=lambda outcome: records.append(outcome.record), on_start=on_start)
    orchestrator.run(cells)
    assert [r.status for r in records] == ["failed", "ok"]
    assert "killed by SIGKILL" in records[0].reason
    assert records[0].cell_id == cells[0].cell_id and records[1].cell_id == cells[1].cell_id


def test_timeout_is_recorded_as_timeout_and_the_next_cell_runs():
    slow, fast = tiny_cells()
    from dataclasses import replace

    slow = replace(slow, measure=replace(slow.measure, timeout_s=0.3))  # cannot even import TF in time
    records = []
    Orchestrator(record=lambda outcome: records.append(outcome.record)).run([slow, fast])
    assert [r.status for r in records] == ["timeout", "ok"]
    assert "0.3 s" in records[0].reason


def test_shared_process_isolation_survives_a_crash_mid_group():
    cells = tiny_cells("optimizer=sgd,adagrad")
    records = []
    orchestrator = None
    killed = []

    def on_start(cell):
        if cell is cells[1] and not killed:
            killed.append(cell)
            time.sleep(0.3)
            os.kill(orchestrator._process.pid, signal.SIGKILL)

    orchestrator = Orchestrator(record=lambda outcome: records.append(outcome.record), isolation="env", on_start=on_start)
    orchestrator.run(cells)
    assert [r.status for r in records] == ["ok", "failed", "ok", "ok"]
    assert len({r.worker["pid"] for r in records if r.status == "ok"}) == 2  # restarted once
    assert all(r.isolation == "env" for r in records if r.status == "ok")


def test_ctrl_c_keeps_finished_records_and_resume_completes_the_rest(tmp_path):
    out = tmp_path / "r.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # SIGINT back to its default in the child: a test run started from a background shell
    # inherits it ignored, and Python then installs no KeyboardInterrupt handler.
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparsebench", "run", "--suite", str(TINY), "--output", str(out),
         "--set", "optimizer=sgd,lazy_adam,adagrad"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 600  # the first record: generous on a loaded machine
    while not (out.exists() and len(out.read_text().splitlines()) >= 2):  # header + one record
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            stdout, stderr = proc.communicate()
            pytest.fail(f"no record before the interrupt (exit {proc.returncode}):\n{stdout}\n{stderr}")
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"run did not stop within 600 s of SIGINT:\n{stdout}\n{stderr}")
    assert proc.returncode == 130, stdout + stderr
    assert "interrupted" in stderr and "--resume" in stderr and "Traceback" not in stderr
    partial = read_results(out)
    assert 1 <= len(partial.records) < 6 and all(r.status == "ok" for r in partial.records)

    done = cli("run", "--resume", str(out), check=0)
    assert f"({len(partial.records)} already done)" in done.stdout
    final = read_results(out)
    assert len(final.latest()) == 6 and all(r.status == "ok" for r in final.latest())
    assert len(final.records) == 6  # nothing ran twice


def test_thread_settings_asked_for_are_in_effect(tmp_path):
    """What TensorFlow reports is only what it was told; the threads the kernel counts are
    an independent check: the inter-op pool's threads are named tf_Compute."""
    out = tmp_path / "r.jsonl"
    env = {"TF_NUM_INTRAOP_THREADS": "1", "OMP_NUM_THREADS": "3"}  # a user's shell: must not leak into cells
    done = cli("run", "--suite", str(TINY), "--output", str(out), "--set", "variant=embedding_lookup_sparse",
               "--set", "intra_op_threads=1,2", "--set", "inter_op_threads=1,2", "--set", "omp_num_threads=1",
               "--set", "onednn=false", check=0, env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    assert "TF_NUM_INTRAOP_THREADS=1 in your environment is ignored" in done.stderr
    assert "OMP_NUM_THREADS=3 in your environment is ignored" in done.stderr
    results = read_results(out)
    assert results.header["environment"]["ignored_variables"] == env
    by_threads = {}
    for record in results.records:
        effect = record.threads_in_effect
        want_intra, want_inter = record.axes["intra_op_threads"], record.axes["inter_op_threads"]
        assert effect["intra_op_threads"] == want_intra and effect["inter_op_threads"] == want_inter
        assert effect["omp_num_threads"] == "1" and effect["tf_enable_onednn_opts"] == "0"
        assert record.tensorflow["onednn_env"] == "0"
        assert effect["os_threads"]["tf_Compute"] == want_inter
        by_threads[(want_intra, want_inter)] = effect["os_threads"]["total"] - effect["os_threads"]["tf_Compute"]
    # The intra-op pool grows with intra_op_threads, whatever the inter-op setting.
    assert by_threads[(2, 1)] > by_threads[(1, 1)] and by_threads[(2, 2)] > by_threads[(1, 2)]


def test_gpu_cell_without_gpu_is_skipped_or_fails_with_require_gpu(tmp_path):
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    out = tmp_path / "r.jsonl"
    args = ["run", "--suite", str(TINY), "--set", "variant=embedding_lookup_sparse", "--set", "device=gpu"]
    done = cli(*args, "--output", str(out), check=0)
    assert "skipped: no GPU" in done.stdout
    assert read_results(out).records[0].reason == "no GPU"
    done = cli(*args, "--output", str(tmp_path / "r2.jsonl"), "--require-gpu", check=1)
    assert "no GPU (--require-gpu)" in done.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["run", "--suite", "nope"], "unknown suite 'nope'"),
        (["run", "--suite", "smoke", "--set", "variant=warp_drive"], "--set variant: 'warp_drive' is not a known variant"),
        (["report", "/nonexistent/r.jsonl"], "/nonexistent/r.jsonl: no such results file"),
        (["run", "--suite", "smoke", "--output", "/proc/forbidden/r.jsonl"], "cannot write results"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message):
    done = cli(*args, check=2)
    assert message in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("text,message", [
    ("[matrix\nbatch_size = [1]\n", "bad.toml: invalid TOML"),
    ('[matrix]\nvariant = ["nope"]\n', "bad.toml: matrix.variant: 'nope' is not a known variant"),
    ("[matrix]\nbatch_size = [-1]\n", "bad.toml: matrix.batch_size: -1 is not an integer >= 1"),
])
def test_malformed_suite_file_is_one_line_exit_2(tmp_path, text, message):
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    done = cli("run", "--suite", str(bad), "--output", str(tmp_path / "r.jsonl"), check=2)
    assert message in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r.jsonl").exists()


def test_corrupt_results_file_names_the_line(tmp_path):
    out = tmp_path / "r.jsonl"
    cli("run", "--suite", str(TINY), "--output", str(out), "--set", "variant=embedding_lookup_sparse", check=0)
    lines = out.read_text().splitlines()
    out.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    done = cli("report", str(out), check=2)
    assert f"{out}:2: corrupt record" in done.stderr
    # A torn last line (the writer died mid-line) is only a warning.
    out.write_text("\n".join(lines) + '\n{"cell_id": "x", "sta')
    done = cli("report", str(out), check=0)
    assert "incomplete last line" in done.stderr


# -- --resume keeps the run what it was (issue 10.2, 10.8) --------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished two-cell run of the tiny suite, copied by each test that changes it."""
    out = tmp_path_factory.mktemp("run") / "done.jsonl"
    cli("run", "--suite", str(TINY), "--output", str(out), "--quiet", check=0)
    return out


def _copy(source, tmp_path, keep_records=None, header=None):
    lines = source.read_text().splitlines()
    head = json.loads(lines[0])
    if header is not None:
        head = header(head)
    records = lines[1:] if keep_records is None else lines[1:1 + keep_records]
    path = tmp_path / "r.jsonl"
    path.write_text("\n".join([json.dumps(head), *records]) + "\n")
    return path


def test_resume_after_a_torn_last_line_leaves_a_readable_file(finished_run, tmp_path):
    path = _copy(finished_run, tmp_path)
    text = path.read_text().rstrip("\n")
    path.write_text(text[: len(text) - len(text.splitlines()[-1]) // 2])  # the last record cut in half
    done = cli("run", "--resume", str(path), check=0)
    assert "dropped an incomplete last line" in done.stderr
    assert "1 cells run (1 already done): 1 ok" in done.stdout
    results = read_results(path)
    assert results.warnings == [] and len(results.records) == 2
    cli("report", str(path), check=0)


@pytest.mark.parametrize("args,message", [
    (["--set", "batch_size=64"], "--set batch_size=64 is not one of the run's settings (none)"),
    (["--output", "other.jsonl"], "the run is completed in that file; drop --output"),
])
def test_resume_refuses_options_it_would_ignore(finished_run, tmp_path, args, message):
    path = _copy(finished_run, tmp_path, keep_records=1)
    done = cli("run", "--resume", str(path), *args, check=2)
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_resume_of_a_file_without_a_suite_is_one_line(finished_run, tmp_path):
    def strip(head):
        del head["run"]["suite_text"]
        return head

    path = _copy(finished_run, tmp_path, header=strip)
    done = cli("run", "--resume", str(path), check=2)
    assert "its header holds no suite to resume" in done.stderr and "Traceback" not in done.stderr


def test_resume_on_another_machine_is_refused_unless_allowed(finished_run, tmp_path):
    def elsewhere(head):
        head["environment"]["cpu"]["model"] = "Some Other CPU"
        return head

    path = _copy(finished_run, tmp_path, keep_records=1, header=elsewhere)
    done = cli("run", "--resume", str(path), check=2)
    assert "this machine is not the one that started the run (CPU model differs" in done.stderr
    done = cli("run", "--resume", str(path), "--allow-env-change", check=0)
    resumed = read_results(path).records[-1]
    assert resumed.status == "ok"
    assert resumed.environment_changed_on_resume[0].startswith("CPU model differs")


def test_resume_with_require_gpu_reruns_cells_skipped_for_want_of_a_gpu(tmp_path):
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    out = tmp_path / "r.jsonl"
    cli("run", "--suite", str(TINY), "--set", "variant=embedding_lookup_sparse", "--set", "device=gpu",
        "--output", str(out), check=0)
    done = cli("run", "--resume", str(out), "--require-gpu", check=1)
    assert "1 cells run: 1 failed" in done.stdout and "no GPU (--require-gpu)" in done.stdout


def test_resume_accepts_the_same_settings_and_names_the_one_that_differs(finished_run, tmp_path):
    """Re-running the same command line with --resume added works; a changed --set is named."""
    path = _copy(finished_run, tmp_path, keep_records=1,
                 header=lambda h: {**h, "run": {**h["run"], "overrides": ["windows=3"]}})
    done = cli("run", "--resume", str(path), "--set", "windows=4", check=2)
    assert "--set windows=4 is not one of the run's settings (windows=3)" in done.stderr
    done = cli("run", "--resume", str(path), "--set", "windows=3", check=0)
    assert "1 cells run (1 already done): 1 ok" in done.stdout


def test_resume_with_a_cluster_still_checks_the_data_files_first(finished_run, tmp_path):
    """--cluster used to skip the up-front check: a missing source must stop the run in one
    line before any cell, whatever the cluster."""
    source = tmp_path / "gone.libsvm"
    source.write_text("1 1:1\n" * 10)
    path = _copy(finished_run, tmp_path, keep_records=1, header=lambda h: {**h, "run": {
        **h["run"], "suite_text": h["run"]["suite_text"] + f'\n[data]\nsource = "{source}"\nformat = "libsvm"\n'
        if "[data]" not in h["run"]["suite_text"] else h["run"]["suite_text"].replace(
            "[data]", f'[data]\nsource = "{source}"\nformat = "libsvm"', 1)}})
    source.unlink()
    cluster = tmp_path / "cluster.json"
    cluster.write_text(json.dumps({"chief": ["localhost:1"], "ps": ["localhost:2"], "worker": ["localhost:3"]}))
    done = cli("run", "--resume", str(path), "--cluster", str(cluster), check=2)
    assert f"data.source: {source}: no such file" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("change,message", [
    (lambda h: {**h, "run": None}, "corrupt header ('run' is null"),
    (lambda h: {**h, "environment": None}, "corrupt header ('environment' is null"),
    (lambda h: {**h, "run": {**h["run"], "suite_text": 5}}, "header run.suite_text is int 5, not str"),
    (lambda h: {**h, "run": {**h["run"], "overrides": "windows=3"}}, "header run.overrides is str"),
    (lambda h: {**h, "run": {**h["run"], "overrides": [3]}}, "run.overrides must be a list of KEY=VALUE strings"),
])
def test_resume_of_a_header_with_wrong_types_is_one_line(finished_run, tmp_path, change, message):
    path = _copy(finished_run, tmp_path, keep_records=1, header=change)
    done = cli("run", "--resume", str(path), check=2)
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_quality_rests_on_the_same_steps_whatever_the_timing(tmp_path):
    """AUC and loss come from the quality phase (quality_steps from the initial weights),
    not from after the timed windows: a cell timed for 3 steps and the same cell timed for
    24 report the same quality, and say which steps it rests on."""
    quality = {}
    for windows in (1, 8):
        out = tmp_path / f"w{windows}.jsonl"
        cli("run", "--suite", str(TINY), "--set", "variant=embedding_lookup_sparse", "--set", f"windows={windows}",
            "--set", "quality_steps=30", "--set", "intra_op_threads=1", "--set", "inter_op_threads=1",
            "--output", str(out), "--quiet", check=0)
        (record,) = read_results(out).records
        assert record.quality_steps == 30 and record.steps_timed == 3 * windows
        quality[windows] = record
    assert quality[1].auc == pytest.approx(quality[8].auc, abs=1e-6)
    assert quality[1].eval_loss == pytest.approx(quality[8].eval_loss, rel=1e-5)
