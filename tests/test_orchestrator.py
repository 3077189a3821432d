"""The orchestrator's process handling with a stand-in worker (no TensorFlow)."""

import os
import sys
import time
from pathlib import Path

from sparsebench.execute import orchestrator
from sparsebench.execute.orchestrator import (
    Orchestrator,
    inherited_variables,
    worker_environment,
)
from sparsebench.plan.suite import load_suite

TINY = Path(__file__).parent / "fixtures" / "tiny.toml"

# Writes its one cell's record, then never exits (a worker hung in TensorFlow's teardown).
HANGING_WORKER = """
import json, sys, time, os
out = sys.argv[sys.argv.index("--out") + 1]
with open(os.path.join(out, "0.tmp"), "w") as fh:
    json.dump({"status": "ok", "reason": None}, fh)
os.replace(os.path.join(out, "0.tmp"), os.path.join(out, "0.json"))
with open(os.path.join(os.environ["SPARSEBENCH_TEST_MARKER"], "pid"), "w") as fh:
    fh.write(str(os.getpid()))
time.sleep(600)
"""


def test_a_worker_that_does_not_exit_after_its_last_cell_is_killed(tmp_path, monkeypatch):
    script = tmp_path / "fake_python.py"
    script.write_text(HANGING_WORKER)
    launcher = tmp_path / "python"
    launcher.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")
    launcher.chmod(0o755)
    monkeypatch.setattr(orchestrator, "EXIT_GRACE_S", 0.5)
    monkeypatch.setenv("SPARSEBENCH_TEST_MARKER", str(tmp_path))  # SPARSEBENCH_* reaches the worker
    (cell,) = load_suite(str(TINY)).cells()[:1]
    records = []
    started = time.monotonic()
    Orchestrator(record=lambda outcome: records.append(outcome.record), python=str(launcher)).run([cell])
    assert time.monotonic() - started < 30
    assert [r.status for r in records] == ["ok"]
    pid = int((tmp_path / "pid").read_text())
    assert not Path(f"/proc/{pid}").exists()  # killed and reaped


def test_cell_owned_variables_never_reach_a_worker_and_framework_ones_are_recorded():
    (cell,) = load_suite(str(TINY)).cells()[:1]
    parent = {"PATH": "/bin", "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "3",
              "TF_ENABLE_ONEDNN_OPTS": "0", "OMP_NUM_THREADS": "7", "TF_XLA_FLAGS": "--tf_xla_auto_jit=2",
              "XLA_FLAGS": "--xla_dump_to=/tmp/x", "UNRELATED": "1"}
    env = worker_environment(cell, parent)
    for owned in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "TF_ENABLE_ONEDNN_OPTS", "OMP_NUM_THREADS"):
        assert owned not in env
    assert env["TF_XLA_FLAGS"] == "--tf_xla_auto_jit=2" and "UNRELATED" not in env
    passed, dropped = inherited_variables(parent)
    assert passed == {"TF_XLA_FLAGS": "--tf_xla_auto_jit=2", "XLA_FLAGS": "--xla_dump_to=/tmp/x",
                      "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}  # the default, recorded
    assert set(dropped) == {"TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "TF_ENABLE_ONEDNN_OPTS",
                            "OMP_NUM_THREADS"}
    assert os.environ.get("PATH")  # the real environment is untouched


def test_workers_get_huge_pages_unless_the_user_sets_glibc_tunables():
    (cell,) = load_suite(str(TINY)).cells()[:1]
    assert worker_environment(cell, {"PATH": "/bin"})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert inherited_variables({"PATH": "/bin"})[0] == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    mine = {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert worker_environment(cell, mine)["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"
    assert inherited_variables(mine)[0] == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
