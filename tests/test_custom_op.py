"""The fused custom op: building and caching, what happens without a compiler, and the
fused updates against the owned optimizers.

The op is compiled once per machine into a per-user cache; tests that need it skip with
the reason where it cannot be built, unless SPARSEBENCH_REQUIRE_CUSTOM_OP=1 (CI) makes
that a failure.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import require_custom_op

ROOT = Path(__file__).resolve().parent.parent
TINY = Path(__file__).parent / "fixtures" / "tiny.toml"


def env(**extra):
    return {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", **extra}


def cli(*args, check=None, **extra):
    done = subprocess.run([sys.executable, "-m", "sparsebench", *args], capture_output=True, text=True, env=env(**extra))
    if check is not None:
        assert done.returncode == check, done.stdout + done.stderr
    return done


@pytest.fixture(scope="session")
def custom_op():
    from sparsebench.train.custom_ops import build

    require_custom_op()
    return build.load()


# -- without a compiler, or with a failing one ----------------------------------------------
def test_cells_that_need_the_op_are_skipped_where_no_compiler_exists(tmp_path):
    out = tmp_path / "r.jsonl"
    done = cli("run", "--suite", str(TINY), "--set", "variant=fused_custom_op,embedding_lookup_sparse",
               "--output", str(out), check=0, CXX="/nonexistent/c++", SPARSEBENCH_OPS_CACHE=str(tmp_path / "cache"))
    assert "custom op unavailable: C++ compiler '/nonexistent/c++' not found" in done.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    records = {r["axes"]["variant"]: r for r in lines[1:]}
    assert records["fused_custom_op"]["status"] == "skipped"
    assert records["fused_custom_op"]["reason"].startswith("custom op unavailable: C++ compiler")
    assert records["embedding_lookup_sparse"]["status"] == "ok"
    # the stock cell ran, without the bound the op library would have measured
    assert records["embedding_lookup_sparse"]["bound_reason"].startswith("custom op unavailable: C++ compiler")
    assert "bound_samples_per_sec" not in records["embedding_lookup_sparse"]
    assert lines[0]["run"]["custom_op"]["ok"] is False
    assert "1 ok, 1 skipped" in done.stdout


def test_ops_status_and_build_say_why_not(tmp_path):
    extra = {"CXX": "/nonexistent/c++", "SPARSEBENCH_OPS_CACHE": str(tmp_path / "cache")}
    done = cli("ops", "status", check=1, **extra)
    assert done.stdout.startswith("not built: C++ compiler '/nonexistent/c++' not found")
    done = cli("ops", "build", check=2, **extra)
    assert "custom op unavailable: C++ compiler" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def _fake_compiler(tmp_path, body: str, knows_no_fp16: bool = True) -> Path:
    """A stand-in compiler running `body`; it answers the builder's flag probe (a
    preprocess-only run) as a compiler that does or does not know -mno-avx512fp16."""
    script = tmp_path / "fake-c++"
    probe = f'case "$1" in -mno-avx512fp16) exit {0 if knows_no_fp16 else 1};; esac\n'
    script.write_text("#!/bin/sh\n" + probe + body)
    script.chmod(0o755)
    return script


@pytest.mark.parametrize("knows", [True, False])
def test_fp16_is_switched_off_only_where_the_compiler_knows_the_flag(tmp_path, knows):
    """GCC 12 cannot compile Eigen's FP16 packet math under -march=native on an AVX512-FP16
    CPU; the flag that avoids it must not reach a compiler that does not know it."""
    cxx = _fake_compiler(tmp_path, 'case "$1" in --version) echo fake 1.0; exit 0;; esac\n'
                                   'while [ "$1" != "-o" ]; do shift; done; echo lib > "$2"\n', knows_no_fp16=knows)
    cli("ops", "build", CXX=str(cxx), SPARSEBENCH_OPS_CACHE=str(tmp_path / "cache"))
    command = next((tmp_path / "cache").glob("*.log")).read_text().splitlines()[0]
    assert ("-mno-avx512fp16" in command) is knows and "-march=native" in command


def test_a_compile_error_is_one_line_and_the_log_path(tmp_path):
    cxx = _fake_compiler(tmp_path, 'case "$1" in --version) echo fake 1.0; exit 0;; esac\n'
                                   'echo "fused_layer.cc:1:1: error: boom" >&2; exit 1\n')
    done = cli("ops", "build", check=2, CXX=str(cxx), SPARSEBENCH_OPS_CACHE=str(tmp_path / "cache"))
    message = done.stderr.strip()
    assert "compiling the custom op failed: fused_layer.cc:1:1: error: boom" in message
    log = Path(message.split("(compiler log: ")[1].rstrip(")"))
    assert log.exists() and "error: boom" in log.read_text()
    assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-built is left to load


def test_workers_starting_together_compile_once(tmp_path):
    """Two builds at once into an empty cache: the lock makes the second wait and reuse the
    first's library (a stand-in compiler counts its runs and writes the output file)."""
    counter = tmp_path / "runs"
    cxx = _fake_compiler(tmp_path, 'case "$1" in --version) echo fake 1.0; exit 0;; esac\n'
                                   f'echo run >> {counter}\nsleep 2\n'
                                   'while [ "$1" != "-o" ]; do shift; done; echo lib > "$2"\n')
    code = "from sparsebench.train.custom_ops.build import build, as_dict; import json; print(json.dumps(as_dict(build())))"
    extra = env(CXX=str(cxx), SPARSEBENCH_OPS_CACHE=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=extra)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    infos = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert all(i["ok"] for i in infos) and sorted(i["cached"] for i in infos) == [False, True]
    assert counter.read_text().count("run") == 1
    assert len({i["library"] for i in infos}) == 1


LOAD_AND_RUN = textwrap.dedent("""
    import json
    import tensorflow as tf
    from sparsebench.train.custom_ops import build
    from sparsebench.train.custom_ops.ops import fused_layer
    table = tf.Variable(tf.ones([4, 2]))
    out, _ = fused_layer(table, tf.constant([0, 0], tf.int64), tf.constant([1, 3], tf.int64), tf.constant([1., 2.]), 1)
    print(json.dumps({"out": out.numpy().tolist(), "build": build.loaded_build(), "library": build.build().library}))
""")


def test_a_cached_library_loads_where_no_compiler_is(custom_op, tmp_path):
    """The manifest names the library built for this machine, so loading it runs no
    compiler: with CXX pointing nowhere the op still loads and runs, and says how it was
    built. The record of a cell carries the same build facts."""
    from sparsebench.train.custom_ops import build

    built = build.build()
    done = subprocess.run([sys.executable, "-c", LOAD_AND_RUN], capture_output=True, text=True,
                          env=env(CXX="/nonexistent/c++"), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["out"] == [[3.0, 3.0]] and result["library"] == built.library
    assert result["build"]["target"] == "native" and "-DNDEBUG" in result["build"]["flags"]
    assert cli("ops", "status", check=0, CXX="/nonexistent/c++").stdout.startswith("built: ")


def test_the_portable_target_builds_for_avx2_and_fma(tmp_path):
    cxx = _fake_compiler(tmp_path, 'case "$1" in --version) echo fake 1.0; exit 0;; esac\n'
                                   'while [ "$1" != "-o" ]; do shift; done; echo lib > "$2"\n')
    done = cli("ops", "build", "--target", "portable", check=0, CXX=str(cxx),
               SPARSEBENCH_OPS_CACHE=str(tmp_path / "cache"))
    assert "target portable: -O3 -mavx2 -mfma -fno-math-errno -DNDEBUG" in done.stdout
    command = next((tmp_path / "cache").glob("*.log")).read_text().splitlines()[0]
    assert "-march" not in command and "-mavx2 -mfma" in command and "-mno-avx512fp16" not in command
    # the native build is another library: the target is part of both keys
    native = cli("ops", "build", check=0, CXX=str(cxx), SPARSEBENCH_OPS_CACHE=str(tmp_path / "cache"))
    assert "compiled in" in native.stdout and "target native: -O3 -march=native" in native.stdout
    assert len(list((tmp_path / "cache").glob("*.so"))) == 2
    done = cli("ops", "build", check=2, SPARSEBENCH_OPS_TARGET="fast", SPARSEBENCH_OPS_CACHE=str(tmp_path / "cache"))
    assert "SPARSEBENCH_OPS_TARGET='fast': not a build target (known: native, portable)" in done.stderr


# -- the op itself -----------------------------------------------------------------------------
FUSED_VS_OPTIMIZER = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(1)
    from sparsebench.plan.spec import DataSpec, ModelSpec
    from sparsebench.train.inputs.data import SyntheticData
    from sparsebench.train.inputs.data import to_sparse_tensor
    from sparsebench.train.model.trainer import build_trainer

    optimizer = sys.argv[1]
    data = SyntheticData(DataSpec(feature_bits=12, mean_active=20))
    batches = [(to_sparse_tensor(b, data.num_features), tf.constant(b.labels)) for b in data.batches(64, 20)]
    seen = np.unique(np.concatenate([sp.indices.numpy()[:, 1] for sp, _ in batches]))
    init = np.random.default_rng(0).normal(0, 0.01, size=(data.num_features, 8)).astype(np.float32)
    result = {}
    for fused in (True, False):
        trainer = build_trainer(ModelSpec(out_dim=8, variant="fused_custom_op", optimizer=optimizer),
                                data.num_features, "/CPU:0", fused_updates=fused)
        trainer.model.kernel.tables[0].assign(init)
        losses = [float(trainer.train_step(*b)) for b in batches]
        table = trainer.model.kernel.tables[0].numpy()
        result[fused] = (trainer.update_path, losses, table, trainer.model.norm.bias_x.numpy())
    (path_f, loss_f, table_f, bias_f), (path_o, loss_o, table_o, bias_o) = result[True], result[False]
    unseen = np.setdiff1d(np.arange(data.num_features), seen)
    print(json.dumps({
        "paths": [path_f, path_o],
        "max_table_diff": float(np.abs(table_f - table_o).max()),
        "max_bias_diff": float(np.abs(bias_f - bias_o).max()),
        "max_loss_diff": float(np.abs(np.array(loss_f) - np.array(loss_o)).max()),
        "unseen_rows": int(len(unseen)),
        "unseen_identical": bool(np.array_equal(table_f[unseen], init[unseen])
                                 and np.array_equal(table_o[unseen], init[unseen])),
        "moved": float(np.abs(table_f - init).max()),
    }))
""")


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "lazy_adam"])
def test_fused_updates_match_the_owned_optimizers_after_20_steps(custom_op, optimizer):
    """At one intra-op thread (set before TensorFlow starts: a fresh interpreter)."""
    done = subprocess.run([sys.executable, "-c", FUSED_VS_OPTIMIZER, optimizer], capture_output=True, text=True,
                          env=env(), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["paths"] == ["fused", "optimizer"]
    assert result["moved"] > 1e-3  # the updates did something
    assert result["max_table_diff"] < 1e-5 and result["max_bias_diff"] < 1e-5
    assert result["max_loss_diff"] < 1e-5
    assert result["unseen_rows"] > 0 and result["unseen_identical"]


FUSED_AT_THREADS = textwrap.dedent("""
    import hashlib, sys
    import numpy as np
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[2]))
    from sparsebench.plan.spec import DataSpec, ModelSpec
    from sparsebench.train.inputs.data import SyntheticData
    from sparsebench.train.inputs.data import to_sparse_tensor
    from sparsebench.train.model.trainer import build_trainer

    data = SyntheticData(DataSpec(feature_bits=10, mean_active=40))
    trainer = build_trainer(ModelSpec(out_dim=8, variant="fused_custom_op", optimizer=sys.argv[1]),
                            data.num_features, "/CPU:0")
    trainer.model.kernel.tables[0].assign(np.random.default_rng(0).normal(0, 0.01, (data.num_features, 8)))
    for b in data.batches(128, 10):
        trainer.train_step(to_sparse_tensor(b, data.num_features), tf.constant(b.labels))
    state = [trainer.model.kernel.tables[0].numpy(), trainer.model.norm.bias_x.numpy()]
    print(trainer.update_path, hashlib.sha256(b"".join(a.tobytes() for a in state)).hexdigest())
""")


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "lazy_adam"])
def test_fused_updates_do_not_depend_on_the_thread_count(custom_op, optimizer):
    """Keys are sharded among threads and each key's entries summed in batch order, so 1 and
    4 intra-op threads leave bit-identical tables (repeated keys included: 2**10 features)."""
    digests = set()
    for threads in ("1", "4"):
        done = subprocess.run([sys.executable, "-c", FUSED_AT_THREADS, optimizer, threads], capture_output=True,
                              text=True, env=env(), timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        path, digest = done.stdout.strip().splitlines()[-1].split()
        assert path == "fused"
        digests.add(digest)
    assert len(digests) == 1


def test_the_traced_step_runs_the_fused_ops(custom_op):
    from collections import Counter

    from sparsebench.plan.spec import ModelSpec
    from sparsebench.train.model.trainer import build_trainer

    def ops(optimizer):
        trainer = build_trainer(ModelSpec(out_dim=4, variant="fused_custom_op", optimizer=optimizer), 2**10, "/CPU:0")
        graph = trainer.train_step.get_concrete_function().graph
        return trainer.update_path, Counter(op.type for op in graph.get_operations())

    path, sgd = ops("sgd")
    assert path == "fused" and sgd["SparsebenchFusedLayer"] == 1 and sgd["SparsebenchFusedSgdUpdate"] == 1
    assert sgd["SparsebenchFusedLayerGrad"] == 0 and sgd["ResourceGather"] == 0 and sgd["Unique"] == 0
    path, adam = ops("lazy_adam")
    assert path == "fused" and adam["SparsebenchFusedLazyAdamUpdate"] == 1
    path, adagrad = ops("adagrad")
    assert path == "optimizer" and adagrad["SparsebenchFusedLayerGrad"] == 1


def test_bad_batches_are_errors_not_crashes(custom_op):
    import tensorflow as tf

    from sparsebench.train.custom_ops.ops import fused_layer

    table = tf.Variable(tf.zeros([8, 2]))
    rows, values = tf.constant([0, 0], tf.int64), tf.constant([1.0, 2.0])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"keys\[1\] = 9 is not in \[0, 8\)"):
        fused_layer(table, rows, tf.constant([1, 9], tf.int64), values, 1)
    with pytest.raises(tf.errors.InvalidArgumentError, match="rows must be in ascending order"):
        fused_layer(table, tf.constant([1, 0], tf.int64), tf.constant([1, 2], tf.int64), values, 2)


def test_a_damaged_cached_library_is_reported_and_rebuilt_never_trusted(tmp_path):
    """Garbage at the cached library's path: status says so (exit 1), build rebuilds it."""
    cxx = _fake_compiler(tmp_path, 'case "$1" in --version) echo fake 1.0; exit 0;; esac\n'
                                   'while [ "$1" != "-o" ]; do shift; done; echo lib > "$2"\n')
    extra = dict(CXX=str(cxx), SPARSEBENCH_OPS_CACHE=str(tmp_path / "cache"))
    cli("ops", "build", check=0, **extra)
    (library,) = (tmp_path / "cache").glob("*.so")
    library.write_bytes(b"garbage")
    done = cli("ops", "status", check=1, **extra)
    assert "the cached library is damaged" in done.stdout and "does not match its checksum" in done.stdout
    done = cli("ops", "build", check=0, **extra)
    assert "compiled in" in done.stdout and "replaced a damaged cached library" in done.stdout
    assert library.read_text() == "lib\n"
    cli("ops", "status", check=0, **extra)


def test_workers_get_the_variables_the_op_cache_is_keyed_on():
    from sparsebench.execute.orchestrator import worker_environment
    from sparsebench.plan.cell import Cell
    from sparsebench.plan.spec import ModelSpec

    env = worker_environment(Cell("s", 8, ModelSpec(variant="fused_custom_op")),
                             {"PATH": "/bin", "XDG_CACHE_HOME": "/c", "CXX": "/usr/bin/g++-12",
                              "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    assert env["XDG_CACHE_HOME"] == "/c" and env["CXX"] == "/usr/bin/g++-12"
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"  # huge pages, where the user asks for them
