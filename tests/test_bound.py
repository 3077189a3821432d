"""The memory bound: the key stream a replay is given, the bytes it must move, the replay
op's checks, `sparsebench bound`, and the bound in every `run` record.

No figure of speed is asserted (the machine decides it): only that the replay measured
something, on the stream the cell trained on, and that the record and report carry it.
"""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import require_custom_op

from sparsebench.train.measure.bound import ROW_TABLES, KeyStream

ROOT = Path(__file__).resolve().parent.parent
TINY = Path(__file__).parent / "fixtures" / "tiny.toml"


def cli(*args, check=None, **extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", **extra}
    done = subprocess.run([sys.executable, "-m", "sparsebench", *args], capture_output=True, text=True, env=env)
    if check is not None:
        assert done.returncode == check, done.stdout + done.stderr
    return done


def two_batches() -> KeyStream:
    # batch 1: examples 0,0,1 with keys 5,3,5; batch 2: example 0 with keys 7,7
    return KeyStream.of([(np.array([0, 0, 1]), np.array([5, 3, 5])), (np.array([0, 0]), np.array([7, 7]))])


def test_a_key_stream_keeps_each_batchs_distinct_keys_in_first_seen_order():
    stream = two_batches()
    assert stream.keys.tolist() == [5, 3, 5, 7, 7] and stream.splits.tolist() == [0, 3, 5]
    assert stream.unique.tolist() == [5, 3, 7] and stream.unique_splits.tolist() == [0, 2, 3]
    assert stream.samples == 3


@pytest.mark.parametrize("optimizer, normalize, expected", [
    # forward: 5 entries x (4 cols x 4 B [+ 8 B max and bias]); update: 3 distinct rows read and written
    ("sgd", False, 5 * 16 + 3 * 2 * 16),
    ("sgd", True, 5 * 24 + 3 * 2 * (16 + 4)),
    ("lazy_adam", True, 5 * 24 + 3 * 2 * (3 * 16 + 3 * 4)),
    # dense Adam decays every row of its three tables in each of the 2 batches
    ("adam", False, 5 * 16 + 10 * 2 * 2 * 3 * 16),
])
def test_the_bytes_a_pass_must_move(optimizer, normalize, expected):
    assert two_batches().traffic_bytes(10, 4, optimizer, normalize) == expected


def test_every_optimizer_has_its_row_passes():
    from sparsebench.plan.spec import OPTIMIZERS

    assert set(ROW_TABLES) == set(OPTIMIZERS)


@pytest.fixture(scope="module")
def tf():
    require_custom_op()
    import tensorflow as tf

    return tf


def test_the_replay_measures_windows_of_the_stream(tf):
    from sparsebench.train.custom_ops.build import load
    from sparsebench.train.measure.bound import memory_bound

    fields = memory_bound(two_batches(), library=load(), num_keys=10, cols=4, optimizer="lazy_adam", normalize=True,
                          seconds=0.2)
    assert 3 <= len(fields["bound_windows"]) <= 5 and all(r > 0 for r in fields["bound_windows"])
    assert fields["bound_samples_per_sec"] == statistics.median(fields["bound_windows"])
    assert fields["bound_bytes_per_sample"] == two_batches().traffic_bytes(10, 4, "lazy_adam", True) / 3
    assert fields["bound_gb_per_sec"] == pytest.approx(
        fields["bound_bytes_per_sample"] * fields["bound_samples_per_sec"] / 1e9)


def test_the_replay_refuses_keys_outside_its_tables(tf):
    from sparsebench.train.custom_ops.build import load

    with pytest.raises(tf.errors.InvalidArgumentError, match=r"keys\[1\] = 10 is not in \[0, 10\)"):
        load().sparsebench_memory_bound(
            rows=tf.constant([0, 0], tf.int64), keys=tf.constant([1, 10], tf.int64),
            batch_splits=tf.constant([0, 2], tf.int64), unique_keys=tf.constant([1], tf.int64),
            unique_splits=tf.constant([0, 1], tf.int64), num_keys=tf.constant(10, tf.int64),
            cols=tf.constant(4, tf.int64), row_tables=tf.constant(1, tf.int64), dense_update=False, normalize=True,
            passes=tf.constant(1, tf.int64))


@pytest.mark.slow
def test_bound_command_replays_each_cells_stream_without_training(tf, tmp_path):
    out = tmp_path / "bound"
    done = cli("bound", "--suite", str(TINY), "--set", "optimizer=sgd,lazy_adam", "-o", str(out), "-q", check=0)
    assert "4 cells run: 4 ok" in done.stdout
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert lines[0]["run"]["bound_only"] is True and lines[0]["run"]["custom_op"]["ok"] is True
    for record in lines[1:]:
        assert record["bound_samples_per_sec"] > 0 and record["bound_bytes_per_sample"] > 0
        assert "windows" not in record and "loss" not in record  # nothing was trained or timed
        label = record["cell_id"].rsplit("-", 1)[0]
        assert label in done.stdout
    # lazy Adam reads and writes its two moment rows too (the forward pass is shared): on the same
    # stream, its update moves three times the rows of SGD
    by_optimizer = {r["axes"]["optimizer"]: r["bound_bytes_per_sample"] for r in lines[1:]
                    if r["axes"]["variant"] == "embedding_lookup_sparse"}
    assert by_optimizer["lazy_adam"] > 1.5 * by_optimizer["sgd"]
