"""Parameter-server cells: the axis, cluster files, the local cluster's isolation and
lifetime, and one synchronous step checked against a local one.

Clusters run only inside private network namespaces (`unshare --user --net`), so no test
ever opens a port outside loopback of a namespace it created. Where namespaces cannot be
made the cluster tests skip, unless SPARSEBENCH_REQUIRE_PRIVATE_NETWORK=1 (CI) makes
that a failure."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from conftest import require_custom_op

from sparsebench.errors import ConfigError, UserError
from sparsebench.lifetime import UNSHARE, private_network_problem
from sparsebench.plan.cluster_file import from_tf_config, parse_task, read_cluster
from sparsebench.plan.suite import load_suite, parse_suite

ROOT = Path(__file__).resolve().parent.parent


def env(**extra):
    return {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


@pytest.fixture(scope="module")
def private_network():
    problem = private_network_problem()
    if problem:
        if os.environ.get("SPARSEBENCH_REQUIRE_PRIVATE_NETWORK") == "1":
            pytest.fail(f"private network namespaces must work here: {problem}")
        pytest.skip(f"no private network namespace: {problem}")


# -- the axis and cluster files ----------------------------------------------------------------
def test_the_distributed_suite_crosses_local_and_ps_cells_and_keeps_local_ids():
    cells = load_suite("distributed").cells()
    local = [c for c in cells if c.distribution.is_local]
    ps = [c for c in cells if not c.distribution.is_local]
    assert len(local) == 6 and len(ps) == 12  # ps_tasks collapses for local cells
    assert {c.model.variant for c in ps} == {"row_partitioned", "col_partitioned", "fused_custom_op"}
    assert {c.distribution.ps_tasks for c in ps} == {1, 2} and {c.distribution.worker_tasks for c in ps} == {2}
    assert all(c.label.endswith(("ps1w2", "ps2w2")) for c in ps)
    # A local cell's id does not depend on the distribution axis existing.
    plain = parse_suite(textwrap.dedent("""
        [data]
        feature_bits = 20
        mean_active = 100
        [model]
        out_dim = 50
        hidden_units = [32]
        [measure]
        timeout_s = 240
        [matrix]
        batch_size = [1024]
        variant = ["row_partitioned"]
        shards = [2]
        optimizer = ["sgd"]
    """), "plain.toml", "distributed").cells()
    assert plain[0].cell_id in {c.cell_id for c in local}


def test_bad_distribution_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="strategy"):
        load_suite("distributed").override("strategy=mesh")
    suite = parse_suite('[matrix]\nstrategy = ["parameter_server"]\nworkers = [2]\n', "w.toml", "w")
    with pytest.raises(ConfigError, match="worker_tasks"):
        suite.cells()
    suite = parse_suite('[matrix]\nstrategy = ["parameter_server"]\ndevice = ["gpu"]\n', "g.toml", "g")
    with pytest.raises(ConfigError, match="CPU"):
        suite.cells()
    suite = parse_suite('[data]\nsource = "x"\nformat = "libsvm"\n[matrix]\nstrategy = ["parameter_server"]\n'
                        'input = ["pipeline"]\n', "p.toml", "p")
    with pytest.raises(ConfigError, match="pipeline input is a local setting"):
        suite.cells()


def test_cluster_files_and_tf_config(tmp_path):
    bare = {"chief": ["a:1"], "ps": ["b:2", "c:3"], "worker": ["d:4"]}
    (tmp_path / "c.json").write_text(json.dumps({"cluster": bare}))
    assert read_cluster(str(tmp_path / "c.json")) == bare
    assert read_cluster(json.dumps(bare)) == bare
    assert parse_task("ps:1", bare) == ("ps", 1)
    for bad, message in [("ps:2", "has 2 ps"), ("chief:0", "expected ps:N"), ("worker", "expected ps:N")]:
        with pytest.raises(ConfigError, match=message):
            parse_task(bad, bare)
    for text, message in [("{", "not JSON"), ('{"ps": ["x"]}', "host:port"), ('{"ps": ["x:1"]}', "no 'worker'"),
                          ('{"gpu": ["x:1"]}', "unknown")]:
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(ConfigError, match=message):
            read_cluster(str(tmp_path / "bad.json"))
    with pytest.raises(ConfigError, match="cannot read"):
        read_cluster(str(tmp_path / "missing.json"))
    cluster, task = from_tf_config({"TF_CONFIG": json.dumps({"cluster": bare, "task": {"type": "worker", "index": 0}})})
    assert cluster == bare and task == "worker:0"
    with pytest.raises(ConfigError, match="TF_CONFIG"):
        from_tf_config({})


def test_serve_and_run_cluster_refuse_bad_input_in_one_line(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"ps": ["127.0.0.1:1"], "worker": ["127.0.0.1:2"]}))
    for args, message in [(["serve", "--task", "ps:0"], "give both"),
                          (["serve", "--cluster", str(tmp_path / "c.json"), "--task", "ps:3"], "has 1 ps"),
                          (["run", "--suite", "distributed", "--cluster", str(tmp_path / "c.json")], "chief")]:
        done = subprocess.run([sys.executable, "-m", "sparsebench", *args], capture_output=True, text=True, env=env(),
                              cwd=tmp_path, timeout=300)
        assert done.returncode == 2, done.stderr
        assert message in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_without_namespaces_ps_cells_are_refused_with_how_to_opt_in(tmp_path, monkeypatch):
    from sparsebench.execute import runner

    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no unshare to be found
    monkeypatch.delenv("SPARSEBENCH_EXPOSED_CLUSTER", raising=False)
    cells = load_suite("distributed").cells()
    with pytest.raises(UserError, match="SPARSEBENCH_EXPOSED_CLUSTER=1") as caught:
        runner.check_cluster_isolation(cells, None)
    assert "unshare" in str(caught.value) and "\n" not in str(caught.value)
    runner.check_cluster_isolation([c for c in cells if c.distribution.is_local], None)  # local cells need nothing
    runner.check_cluster_isolation(cells, {"cluster": {}, "source": "c.json"})  # a real cluster is the user's


# -- a synchronous step on a cluster equals a local one ---------------------------------------
ONE_STEP = textwrap.dedent("""
    import json, sys, tempfile
    from pathlib import Path
    from sparsebench.train.ps.cluster import LocalCluster, bring_loopback_up
    bring_loopback_up()
    import numpy as np
    import tensorflow as tf
    from sparsebench.plan.cell import Cell, Distribution
    from sparsebench.plan.spec import DataSpec, ModelSpec
    from sparsebench.train.inputs.data import SyntheticData
    from sparsebench.train.ps.distributed import PsTraining
    from sparsebench.train.inputs.data import to_sparse_tensor
    from sparsebench.train.model.trainer import build_trainer

    variant, optimizer = sys.argv[1], sys.argv[2]
    spec = ModelSpec(variant=variant, shards=2, out_dim=8, hidden_units=(4,), optimizer=optimizer)
    data = SyntheticData(DataSpec(feature_bits=10, mean_active=20))
    (batch,) = data.batches(64, 1)
    cell = Cell(suite="t", batch_size=64, model=spec, data=data.spec,
                distribution=Distribution("parameter_server", ps_tasks=1, worker_tasks=1, steps_per_execution=1))
    local = build_trainer(spec, data.num_features, "/CPU:0")
    rng = np.random.default_rng(0)
    for variable in local.model.train_variables:  # non-zero everywhere, so every update shows
        variable.assign(rng.normal(0, 0.1, variable.shape).astype(np.float32))
    before = [v.numpy() for v in local.model.train_variables]
    # The local step first: once this process joins a cluster, its local device is renamed.
    local.train_step(to_sparse_tensor(batch, data.num_features), tf.constant(batch.labels))
    after_local = [v.numpy() for v in local.model.train_variables]
    names = [v.name for v in local.model.train_variables]
    with LocalCluster(1, 1, Path(tempfile.mkdtemp())) as cluster:
        cluster.start()
        training = PsTraining(cell, cluster.spec, [batch], data.num_features,
                              build=lambda: build_trainer(spec, data.num_features, None))
        remote = training.trainer.model.train_variables
        for ps_variable, value in zip(remote, before):
            ps_variable.assign(value)
        training.schedule(1)
        training.coordinator.join()
        after_ps = [v.numpy() for v in remote]
        devices = sorted({v.device for v in remote})
    print(json.dumps({
        "names": names,
        "max_diff": max(float(np.abs(a - b).max()) for a, b in zip(after_local, after_ps)),
        "moved": min(float(np.abs(a - b).max()) for a, b in zip(after_local, before)),
        "devices": devices,
    }))
""")


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["row_partitioned", "col_partitioned"])
def test_one_synchronous_step_on_one_ps_and_one_worker_equals_a_local_step(private_network, variant):
    done = subprocess.run([*UNSHARE, sys.executable, "-c", ONE_STEP, variant, "sgd"], capture_output=True, text=True,
                          env=env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["moved"] > 1e-6  # every variable (both shards, bias_x, head) changed
    assert result["max_diff"] < 1e-5
    assert all("/job:ps/" in device for device in result["devices"])


ONE_FUSED_STEP = textwrap.dedent("""
    import json, sys, tempfile
    from pathlib import Path
    from sparsebench.train.ps.cluster import LocalCluster, bring_loopback_up
    bring_loopback_up()
    import numpy as np
    import tensorflow as tf
    from sparsebench.plan.cell import Cell, Distribution
    from sparsebench.plan.spec import DataSpec, ModelSpec
    from sparsebench.train.custom_ops.build import load, loaded_library
    from sparsebench.train.inputs.data import SyntheticData, to_sparse_tensor
    from sparsebench.train.ps.distributed import PsTraining
    from sparsebench.train.ps.fused import ShardedFusedTrainer
    from sparsebench.train.model.trainer import build_trainer

    optimizer, ps_tasks = sys.argv[1], int(sys.argv[2])
    load()
    spec = ModelSpec(variant="fused_custom_op", out_dim=8, hidden_units=(4,), optimizer=optimizer)
    data = SyntheticData(DataSpec(feature_bits=10, mean_active=20))
    batches = data.batches(64, 2)
    cell = Cell(suite="t", batch_size=64, model=spec, data=data.spec,
                distribution=Distribution("parameter_server", ps_tasks=ps_tasks, worker_tasks=1, steps_per_execution=2))
    local = build_trainer(spec, data.num_features, "/CPU:0")
    model = local.model
    rng = np.random.default_rng(0)
    for variable in model.train_variables:  # non-zero everywhere, so every update shows
        variable.assign(rng.normal(0, 0.1, variable.shape).astype(np.float32))
    model.norm.max_x.assign(rng.uniform(0.5, 2.0, model.norm.max_x.shape).astype(np.float32))

    def roles(table, max_x, bias_x, dense):
        return {"table": table, "max_x": max_x, "bias_x": bias_x, **{f"dense{i}": v for i, v in enumerate(dense)}}

    before = roles(model.kernel.tables[0].numpy(), model.norm.max_x.numpy(), model.norm.bias_x.numpy(),
                   [v.numpy() for v in model.dense_variables])
    # Two local steps first: once this process joins a cluster, its local device is renamed.
    for batch in batches:
        local.train_step(to_sparse_tensor(batch, data.num_features), tf.constant(batch.labels))
    after_local = roles(model.kernel.tables[0].numpy(), model.norm.max_x.numpy(), model.norm.bias_x.numpy(),
                        [v.numpy() for v in model.dense_variables])
    with LocalCluster(ps_tasks, 1, Path(tempfile.mkdtemp()), custom_op=loaded_library()) as cluster:
        cluster.start()
        training = PsTraining(cell, cluster.spec, batches, data.num_features,
                              build=lambda: ShardedFusedTrainer(spec, data.num_features, ps_tasks))
        sharded = training.trainer.model
        for i in range(ps_tasks):
            sharded.tables[i].assign(before["table"][i::ps_tasks])
            sharded.maxima[i].assign(before["max_x"][i::ps_tasks])
            sharded.feature_bias[i].assign(before["bias_x"][i::ps_tasks])
        for variable, value in zip(sharded.dense_variables, [before[f"dense{i}"] for i in range(len(model.dense_variables))]):
            variable.assign(value)
        training.schedule(1)  # one function of two synchronous steps on the one worker
        training.coordinator.join()

        def whole(parts):
            full = np.zeros((data.num_features, *parts[0].shape[1:]), np.float32)
            for i, part in enumerate(parts):
                full[i::ps_tasks] = part
            return full

        after_ps = roles(whole([v.numpy() for v in sharded.tables]), whole([v.numpy() for v in sharded.maxima]),
                         whole([v.numpy() for v in sharded.feature_bias]), [v.numpy() for v in sharded.dense_variables])
        devices = {v.name: v.device for v in sharded.tables + sharded.maxima + sharded.feature_bias}
    print(json.dumps({
        "max_diff": {k: float(np.abs(after_local[k] - after_ps[k]).max()) for k in after_local},
        "moved": {k: float(np.abs(after_local[k] - before[k]).max()) for k in after_local},
        "devices": devices,
    }))
""")


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "lazy_adam"])
@pytest.mark.parametrize("ps_tasks", [1, 2])
def test_fused_steps_on_ps_tasks_equal_local_fused_steps(private_network, optimizer, ps_tasks):
    """The table, its maxima and per-feature bias row-sharded (mod) over the PS tasks, each
    task running the fused forward and update for its rows: two synchronous steps leave
    every variable within 1e-5 of two local fused steps."""
    require_custom_op()
    done = subprocess.run([*UNSHARE, sys.executable, "-c", ONE_FUSED_STEP, optimizer, str(ps_tasks)],
                          capture_output=True, text=True, env=env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert min(result["moved"].values()) > 1e-6, result["moved"]  # every variable changed
    assert max(result["max_diff"].values()) < 1e-5, result["max_diff"]
    devices = result["devices"]  # each shard on a PS task of its own, its maxima and bias beside it
    tables = [devices[f"W_shard{i}:0"] for i in range(ps_tasks)]
    assert len(set(tables)) == ps_tasks and all("/job:ps/" in device for device in tables), devices
    for i, device in enumerate(tables):
        assert devices[f"max_x_shard{i}:0"] == devices[f"bias_x_shard{i}:0"] == device, devices


# -- a local cluster's isolation and lifetime ----------------------------------------------------
PS_SUITE = """
name = "ps-life"
[data]
feature_bits = 10
mean_active = 10
[model]
out_dim = 4
hidden_units = [4]
[distribution]
steps_per_execution = 1
[measure]
warmup_steps = 2
windows = 2
seconds_per_window = 60.0
eval_examples = 64
timeout_s = 240
[matrix]
batch_size = [32]
variant = ["row_partitioned"]
shards = [2]
strategy = ["parameter_server"]
ps_tasks = [2]
"""


def _cluster_tasks(root: psutil.Process) -> dict[str, psutil.Process]:
    """The cluster tasks below `root`: task name -> process."""
    tasks = {}
    for child in root.children(recursive=True):
        try:
            command = child.cmdline()
        except psutil.Error:
            continue
        if "sparsebench.train.ps.cluster_task" in command:
            tasks[command[command.index("--task") + 1]] = child
    return tasks


# How long a test waits for a run to reach a point (its cluster up, its windows begun, its
# end): generous, so a loaded machine is slow, not failing; each wait ends early on a marker.
WAIT_S = 600


def _fail_with_output(run: subprocess.Popen, why: str) -> None:
    """Stops the run and fails the test with `why` and everything the run printed."""
    if run.poll() is None:
        run.kill()
    out, err = run.communicate()
    pytest.fail(f"{why} (run exit {run.returncode})\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-5000:]}")


def _wait_for_tasks(run: subprocess.Popen, expected: set[str]) -> dict[str, psutil.Process]:
    deadline = time.monotonic() + WAIT_S
    tasks: dict[str, psutil.Process] = {}
    while set(tasks) != expected:
        if run.poll() is not None:
            _fail_with_output(run, f"the run ended before its cluster tasks {sorted(expected)} were up")
        if time.monotonic() > deadline:
            _fail_with_output(run, f"cluster tasks after {WAIT_S} s: {sorted(tasks)}, expected {sorted(expected)}")
        try:
            tasks = _cluster_tasks(psutil.Process(run.pid))
        except psutil.NoSuchProcess:
            continue
        time.sleep(0.2)
    return tasks


def _finish(run: subprocess.Popen, why: str) -> tuple[str, str]:
    """The run's output once it ends by itself within WAIT_S (else the test fails with it)."""
    try:
        return run.communicate(timeout=WAIT_S)
    except subprocess.TimeoutExpired:
        _fail_with_output(run, f"the run did not end within {WAIT_S} s {why}")
    raise AssertionError("unreachable")


def _records(tmp_path: Path, run: subprocess.Popen, err: str) -> list[dict]:
    out = tmp_path / "out.jsonl"
    assert out.exists(), f"no results file (run exit {run.returncode}):\n{err[-5000:]}"
    return [json.loads(line) for line in out.read_text().splitlines()[1:]]


def fused_suite(text: str) -> str:
    """A PS suite with the fused layer in place of the row-partitioned one."""
    return text.replace('variant = ["row_partitioned"]\nshards = [2]', 'variant = ["fused_custom_op"]\nshards = [1]')


def _start_ps_run(tmp_path: Path, variant: str = "row_partitioned") -> tuple[subprocess.Popen, dict[str, psutil.Process],
                                                                             list[int]]:
    suite = tmp_path / "ps.toml"
    suite.write_text(fused_suite(PS_SUITE) if variant == "fused_custom_op" else PS_SUITE)
    run = subprocess.Popen([sys.executable, "-m", "sparsebench", "run", "--suite", str(suite), "--quiet", "--output",
                            str(tmp_path / "out.jsonl")], env=env(), cwd=tmp_path, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    tasks = _wait_for_tasks(run, {"ps:0", "ps:1", "worker:0"})
    command = tasks["ps:0"].cmdline()
    cluster = json.loads(command[command.index("--cluster") + 1])
    ports = [int(address.rsplit(":", 1)[1]) for addresses in cluster.values() for address in addresses]
    _wait_for_windows(run, tasks["ps:0"])
    return run, tasks, ports


def _wait_for_windows(run: subprocess.Popen, task: psutil.Process) -> None:
    """Until the cell's timed windows have begun: the coordinator marks it beside the
    tasks' logs (the folder of the task's stdout)."""
    folder = Path(os.readlink(f"/proc/{task.pid}/fd/1")).parent
    deadline = time.monotonic() + WAIT_S
    while not (folder / "windows-started").exists():
        if run.poll() is not None or time.monotonic() > deadline:
            _fail_with_output(run, "the cell never reached its timed windows")
        time.sleep(0.1)
    time.sleep(1.0)


def _gone(processes, timeout_s: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in processes):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["row_partitioned", "fused_custom_op"])
def test_a_killed_ps_fails_its_cell_by_name_and_no_port_or_task_outlives_the_run(private_network, tmp_path, variant):
    require_custom_op(variant)
    run, tasks, ports = _start_ps_run(tmp_path, variant)
    try:
        listening = {c.laddr.port for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        assert not listening & set(ports)  # the cluster listens only inside its namespace
        tasks["ps:0"].kill()
        out, err = _finish(run, "after its PS task was killed")
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 1, err  # a failed cell: the run says so
    records = _records(tmp_path, run, err)
    assert [r["status"] for r in records] == ["failed"], err[-5000:]
    assert "ps:0" in records[0]["reason"] and "SIGKILL" in records[0]["reason"], records[0]["reason"]
    assert _gone(tasks.values())


@pytest.mark.slow
def test_kill_9_of_the_run_leaves_no_worker_task_or_port(private_network, tmp_path):
    run, tasks, ports = _start_ps_run(tmp_path)
    below = psutil.Process(run.pid).children(recursive=True)
    os.kill(run.pid, signal.SIGKILL)
    run.communicate(timeout=30)
    assert _gone(below), [p.cmdline() for p in below if p.is_running()]
    listening = {c.laddr.port for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
    assert not listening & set(ports)


@pytest.mark.slow
def test_a_killed_worker_task_is_recovered_and_recorded(private_network, tmp_path):
    suite = tmp_path / "ps.toml"
    suite.write_text(PS_SUITE.replace("seconds_per_window = 60.0", "seconds_per_window = 6.0").replace(
        "[distribution]", "[distribution]\nworker_tasks = 2"))
    run = subprocess.Popen([sys.executable, "-m", "sparsebench", "run", "--suite", str(suite), "--quiet", "--output",
                            str(tmp_path / "out.jsonl")], env=env(), cwd=tmp_path, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        tasks = _wait_for_tasks(run, {"ps:0", "ps:1", "worker:0", "worker:1"})
        _wait_for_windows(run, tasks["worker:1"])
        tasks["worker:1"].kill()
        out, err = _finish(run, "after a worker task was killed")
    finally:
        if run.poll() is None:
            run.kill()
    records = _records(tmp_path, run, err)
    assert [r["status"] for r in records] == ["ok"], ([r.get("reason") for r in records], err[-5000:])
    cluster = records[0]["cluster"]
    assert cluster["recovered"] and "worker:1" in cluster["worker_tasks_lost"]
    per_worker = records[0]["samples_per_sec_per_worker"]
    assert set(per_worker) == {"worker:0", "worker:1"} and per_worker["worker:0"] > 0
    assert per_worker["worker:1"] is None  # lost mid-window: its count is gone with it
    assert _gone(tasks.values())


@pytest.mark.slow
def test_profile_traces_every_task_of_a_ps_cell(private_network, tmp_path):
    suite = tmp_path / "ps.toml"
    suite.write_text(PS_SUITE.replace("ps_tasks = [2]", "ps_tasks = [1]"))
    done = subprocess.run([sys.executable, "-m", "sparsebench", "profile", "--suite", str(suite), "--steps", "6",
                           "--output", str(tmp_path / "prof")], env=env(), cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "prof" / "results.jsonl").read_text().splitlines()[1])
    summary = record["profile"]
    assert set(summary["hosts_ms_per_step"]) == {"ps:0", "worker:0"}
    ops = {row["op_type"] for row in summary["ops"]}
    assert "ResourceScatterSub" in ops and "ResourceGather" in ops  # the PS's side of the step is in the table
    assert "op time per step by task" in done.stdout
    # What the projection rests on, measured untraced over at least 2 s: each task's CPU
    # per step (the coordinator's too) and the PS task's bytes per step.
    cluster = record["cluster"]
    assert set(cluster["cpu_ms_per_step"]) == {"chief", "ps:0", "worker:0"}
    assert all(ms > 0 for ms in cluster["cpu_ms_per_step"].values()), cluster["cpu_ms_per_step"]
    assert cluster["costs_seconds"] >= 2.0 and cluster["costs_steps"] > 0
    assert cluster["ps_bytes_per_step"]["ps:0"]["received"] > 0


REAL_CLUSTER = textwrap.dedent("""
    import json, socket, subprocess, sys, time
    from pathlib import Path
    from sparsebench.train.ps.cluster import bring_loopback_up, free_loopback_ports
    bring_loopback_up()  # this whole script runs in its own network namespace
    folder = Path(sys.argv[1])
    chief, ps, worker = free_loopback_ports(3)
    cluster = {"chief": [f"127.0.0.1:{chief}"], "ps": [f"127.0.0.1:{ps}"], "worker": [f"127.0.0.1:{worker}"]}
    (folder / "cluster.json").write_text(json.dumps({"cluster": cluster}))
    servers = [subprocess.Popen([sys.executable, "-m", "sparsebench", "serve", "--cluster", str(folder / "cluster.json"),
                                 "--task", task, *sys.argv[2:]]) for task in ("ps:0", "worker:0")]
    try:
        for port in (ps, worker):
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.1)
        done = subprocess.run([sys.executable, "-m", "sparsebench", "run", "--suite", str(folder / "ps.toml"), "--quiet",
                               "--cluster", str(folder / "cluster.json"), "--output", str(folder / "out.jsonl")])
        print("RC", done.returncode)
    finally:
        for server in servers:
            server.kill()
""")


@pytest.mark.slow
def test_run_cluster_coordinates_tasks_started_by_serve(private_network, tmp_path):
    """`sparsebench serve` on each task, `run --cluster FILE` as coordinator (all inside one
    private namespace standing in for a network); a cell of another shape is skipped."""
    (tmp_path / "ps.toml").write_text(PS_SUITE.replace("seconds_per_window = 60.0", "seconds_per_window = 1.0")
                                      .replace("ps_tasks = [2]", "ps_tasks = [1, 2]"))
    done = subprocess.run([*UNSHARE, sys.executable, "-c", REAL_CLUSTER, str(tmp_path)], capture_output=True, text=True,
                          env=env(), timeout=400)
    assert "RC 0" in done.stdout, done.stderr[-3000:]
    records = {r["axes"]["ps_tasks"]: r for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines()[1:])}
    assert records[1]["status"] == "ok", records[1].get("reason")
    cluster = records[1]["cluster"]
    assert cluster["source"] == str(tmp_path / "cluster.json") and not cluster["private_network"]
    assert set(cluster["hosts"]) == {"chief:0", "ps:0", "worker:0"}
    assert records[2]["status"] == "skipped" and records[2]["reason"] == "cluster shape differs"
    header = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])
    assert header["run"]["cluster"]["source"] == str(tmp_path / "cluster.json")


@pytest.mark.slow
def test_a_fused_cell_on_tasks_served_without_the_op_library_is_skipped_with_the_reason(private_network, tmp_path):
    """A real cluster whose tasks were started without the fused op library (`serve
    --custom-op off`, as on machines with no compiler): the fused cell is skipped, saying
    which library is missing and how to serve it, not failed with TensorFlow's error."""
    require_custom_op()
    (tmp_path / "ps.toml").write_text(fused_suite(PS_SUITE).replace("seconds_per_window = 60.0", "seconds_per_window = 1.0")
                                      .replace("ps_tasks = [2]", "ps_tasks = [1]"))
    done = subprocess.run([*UNSHARE, sys.executable, "-c", REAL_CLUSTER, str(tmp_path), "--custom-op", "off"],
                          capture_output=True, text=True, env=env(), timeout=400)
    assert "RC 0" in done.stdout, done.stderr[-3000:]
    (record,) = map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines()[1:])
    assert record["status"] == "skipped", record.get("reason")
    assert record["reason"].startswith("custom op unavailable: a task of the cluster has not loaded the fused op library")
    assert "SparsebenchFused" in record["reason"] and "serve --custom-op" in record["reason"]


LOCAL_CLUSTER_WITHOUT_THE_LIBRARY = textwrap.dedent("""
    import sys, tempfile
    from pathlib import Path
    from sparsebench.train.ps.cluster import LocalCluster, bring_loopback_up
    from sparsebench.errors import CellSkipped
    bring_loopback_up()
    with LocalCluster(1, 1, Path(tempfile.mkdtemp()), custom_op=sys.argv[1]) as cluster:
        try:
            cluster.start()
        except CellSkipped as exc:
            print("SKIPPED", exc)
        else:
            print("STARTED")
""")


@pytest.mark.slow
def test_a_task_that_cannot_load_the_op_library_skips_the_cell_naming_the_task(private_network, tmp_path):
    """Each task of a local cluster loads the coordinator's library before its server
    starts; one that cannot ends the start with the cell's skip reason, naming it."""
    missing = tmp_path / "no-such-library.so"
    done = subprocess.run([*UNSHARE, sys.executable, "-c", LOCAL_CLUSTER_WITHOUT_THE_LIBRARY, str(missing)],
                          capture_output=True, text=True, env=env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = done.stdout.strip().splitlines()[-1]
    assert re.match(r"SKIPPED custom op unavailable: (ps|worker):0 cannot load the fused op library", line), line
    assert str(missing) in line


@pytest.mark.slow
def test_a_ps_cell_records_the_file_it_read(private_network, tmp_path):
    """A parameter-server cell's record says what it read, as a local cell's does."""
    from sparsebench.plan.spec import DataSpec
    from sparsebench.train.inputs.data import SyntheticData
    from sparsebench.train.inputs.datafiles import WRITERS

    WRITERS["libsvm"](SyntheticData(DataSpec(feature_bits=10, mean_active=10)).sample(400, stream=0),
                      tmp_path / "x.libsvm")
    suite = (PS_SUITE.replace("seconds_per_window = 60.0", "seconds_per_window = 0.5")
             .replace("ps_tasks = [2]", "ps_tasks = [1]").replace("shards = [2]", "shards = [1]")
             .replace("mean_active = 10", f'mean_active = 10\nsource = "{tmp_path / "x.libsvm"}"\nformat = "libsvm"'))
    (tmp_path / "ps.toml").write_text(suite)
    done = subprocess.run([sys.executable, "-m", "sparsebench", "run", "--suite", str(tmp_path / "ps.toml"), "--quiet",
                           "--output", str(tmp_path / "out.jsonl")], capture_output=True, text=True, env=env(),
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (record,) = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()[1:]]
    assert record["status"] == "ok" and record["cluster"]["ps_tasks"] == 1
    source = record["data_source"]
    assert source["source"] == str(tmp_path / "x.libsvm") and source["read"]["examples"] == 400 - 64
    assert "first 64 examples" in source["held_out"]


# -- the batch pool a PS worker trains on -------------------------------------------------------
def test_a_ps_worker_rebuilds_each_shipped_batch_exactly_and_cycles_the_pool():
    """Workers get the pool as constants in their dataset function; the dataset they
    iterate must give back the local cell's SparseTensors, batch for batch, and cycle."""
    import numpy as np
    import tensorflow as tf

    from sparsebench.plan.spec import DataSpec
    from sparsebench.train.inputs.data import SyntheticData, to_sparse_tensor
    from sparsebench.train.ps.distributed import _dataset_fn

    data = SyntheticData(DataSpec(feature_bits=12, mean_active=15))
    pool = data.batches(16, 3)
    shipped = list(_dataset_fn(pool, data.num_features)().take(len(pool) + 1))
    for (sp, labels), batch in zip(shipped, [*pool, pool[0]]):
        want = to_sparse_tensor(batch, data.num_features)
        assert sp.indices.dtype == tf.int64
        np.testing.assert_array_equal(sp.indices.numpy(), want.indices.numpy())
        np.testing.assert_array_equal(sp.values.numpy(), want.values.numpy())
        np.testing.assert_array_equal(sp.dense_shape.numpy(), want.dense_shape.numpy())
        np.testing.assert_array_equal(labels.numpy(), batch.labels)


def test_the_whole_pool_is_shipped_unless_it_passes_the_byte_cap():
    from sparsebench.plan.spec import DataSpec
    from sparsebench.train.inputs.data import SyntheticData
    from sparsebench.train.ps.distributed import POOL_BYTES_CAP, batches_to_ship, shipped_bytes

    data = SyntheticData(DataSpec(feature_bits=12, mean_active=15))
    pool = data.batches(16, 5)
    sizes = [shipped_bytes(b, data.num_features) for b in pool]
    assert sizes[0] == pool[0].nnz * 20 + 16 * 4 + 8  # int64 [nnz, 2] indices, float32 values and labels
    assert batches_to_ship(pool, data.num_features) == 5
    assert batches_to_ship(pool, data.num_features, cap_bytes=sum(sizes[:3])) == 3
    assert batches_to_ship(pool, data.num_features, cap_bytes=sum(sizes[:3]) - 1) == 2
    assert batches_to_ship(pool, data.num_features, cap_bytes=1) == 1  # never none
    # The distributed suite's pool (32 batches of 1024 x ~100 entries) fits whole.
    assert 32 * (1024 * 100 * 20 + 1024 * 4) < POOL_BYTES_CAP
