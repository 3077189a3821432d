"""The complete model: normalization, discretizer, training quality, devices, Hogwild."""

from collections import Counter

import numpy as np
import pytest
import tensorflow as tf
from conftest import require_custom_op

from sparsebench.errors import NoGPUError
from sparsebench.plan import spec as specs
from sparsebench.plan.spec import DataSpec, ModelSpec
from sparsebench.stats import auc
from sparsebench.train.inputs.data import SyntheticData
from sparsebench.train.model.devices import resolve_device
from sparsebench.train.measure.hogwild import run_hogwild
from sparsebench.train.inputs.data import to_sparse_tensor
from sparsebench.train.model.trainer import build_trainer, calibrate

SMALL = DataSpec(feature_bits=14, mean_active=30)


def tensors(data, batch_size, count, stream=0):
    return [(to_sparse_tensor(b, data.num_features), tf.constant(b.labels)) for b in data.batches(batch_size, count, stream)]


@pytest.fixture(scope="module")
def small_data():
    return SyntheticData(SMALL)


def test_normalization_tames_raw_values_of_a_million(small_data):
    batches = tensors(small_data, 128, 20)
    assert max(float(tf.reduce_max(sp.values)) for sp, _ in batches) > 1e6

    def train(normalization):
        trainer = build_trainer(ModelSpec(out_dim=8, normalization=normalization), SMALL.num_features, "/CPU:0")
        losses = [float(trainer.train_step(*b)) for b in batches]
        return trainer, np.array(losses)

    normed, losses = train(True)
    assert np.all(np.isfinite(losses)) and losses.max() < 2.0
    assert all(np.all(np.isfinite(v.numpy())) for v in normed.model.train_variables)
    _, raw_losses = train(False)
    # Without it the first update multiplies a ~1e6 gradient by the learning rate: the
    # loss explodes (to ~1e7 and beyond) or turns NaN.
    assert not np.all(np.isfinite(raw_losses)) or raw_losses.max() > 1e3


def test_stored_maxima_update_in_training_only(small_data):
    trainer = build_trainer(ModelSpec(out_dim=4), SMALL.num_features, "/CPU:0")
    (sp, labels), (other, _) = tensors(small_data, 64, 2)
    trainer.train_step(sp, labels)
    max_x = trainer.model.norm.max_x.numpy().copy()
    keys = sp.indices.numpy()[:, 1]
    expected = np.zeros(SMALL.num_features, np.float32)
    np.maximum.at(expected, keys, np.abs(sp.values.numpy()))
    np.testing.assert_array_equal(max_x, expected)
    trainer.predict_logits(other)  # inference on unseen rows must not touch the maxima
    np.testing.assert_array_equal(trainer.model.norm.max_x.numpy(), max_x)


def test_normalized_values_are_bounded_and_carry_no_gradient(small_data):
    trainer = build_trainer(ModelSpec(out_dim=4), SMALL.num_features, "/CPU:0")
    sp, _ = tensors(small_data, 64, 1)[0]
    values = tf.Variable(sp.values)
    with tf.GradientTape() as tape:
        normed = trainer.model.norm(sp.indices[:, 1], values, training=True)
    assert tape.gradient(normed, values) is None
    assert float(tf.reduce_max(tf.abs(normed))) <= 1.0 + 1e-6  # bias_x starts at zero


def test_calibration_boundaries_are_percentiles(small_data):
    sample = small_data.sample(3000, stream=3)
    cal = calibrate(sample, n_bin=4)
    assert len(cal.keys) > 0 and cal.boundaries.shape == (len(cal.keys), 5)
    key = cal.keys[0]
    values = sample.values[sample.keys == key]
    np.testing.assert_allclose(cal.boundaries[0], np.quantile(values, np.linspace(0, 1, 5)), rtol=1e-6)
    binary_keys = np.unique(sample.keys[sample.values == 1.0])
    assert not np.isin(cal.keys, binary_keys[~np.isin(binary_keys, sample.keys[sample.values != 1.0])]).any()


def test_discretizer_replaces_calibrated_values_by_bin_keys(small_data):
    sample = small_data.sample(3000, stream=3)
    cal = calibrate(sample, n_bin=4)
    trainer = build_trainer(ModelSpec(out_dim=4, discretizer=True, n_bin=4), SMALL.num_features, "/CPU:0", cal)
    disc = trainer.model.discretizer
    key = int(cal.keys[0])
    low, high = float(cal.boundaries[0, 1]), float(cal.boundaries[0, 3])  # inside bins 0 and 3
    keys = tf.constant([key, key, key, 12345 if 12345 not in cal.keys else 12346], tf.int64)
    values = tf.constant([low * 0.5, low * 0.99 + 0.0, high * 1.5, 7.0], tf.float32)
    new_keys, new_values = disc(keys, values)
    assert new_values.numpy().tolist() == [1.0, 1.0, 1.0, 7.0]  # uncalibrated passes through
    assert new_keys.numpy()[0] == new_keys.numpy()[1] != new_keys.numpy()[2]
    assert new_keys.numpy()[3] == keys.numpy()[3]
    assert np.all((new_keys.numpy() >= 0) & (new_keys.numpy() < SMALL.num_features))


@pytest.mark.slow
@pytest.mark.parametrize("variant,optimizer,min_auc", [
    ("embedding_lookup_sparse", "sgd", 0.65), ("embedding_lookup_sparse", "lazy_adam", 0.75),
    ("embedding_lookup_sparse", "adam", 0.75), ("embedding_lookup_sparse", "adagrad", 0.67),
    ("embedding_lookup_sparse", "ftrl", 0.67),
    ("fused_custom_op", "sgd", 0.65), ("fused_custom_op", "lazy_adam", 0.75),  # the fused updates
])
def test_training_learns_the_planted_signal(small_data, variant, optimizer, min_auc):
    """300 steps at batch 256 on fresh batches. Measured held-out AUC here: sgd 0.687,
    lazy_adam 0.777, adam 0.779, adagrad 0.702, ftrl 0.702 (an untrained model: 0.5)."""
    require_custom_op(variant)
    batches = tensors(small_data, 256, 300)
    held_out = small_data.held_out(4000)
    trainer = build_trainer(ModelSpec(out_dim=8, optimizer=optimizer, variant=variant), SMALL.num_features, "/CPU:0")
    before = auc(held_out.labels, trainer.predict_logits(to_sparse_tensor(held_out, SMALL.num_features)).numpy())
    for batch in batches:
        trainer.train_step(*batch)
    after = auc(held_out.labels, trainer.predict_logits(to_sparse_tensor(held_out, SMALL.num_features)).numpy())
    assert after > min_auc, f"held-out AUC {after:.3f} (before training {before:.3f})"


COMPLETE_MODEL_VARIANTS = [("embedding_lookup_sparse", 1), ("embedding_lookup_sparse_fast", 1),
                           ("ragged_embedding_lookup", 1), ("row_partitioned", 3), ("col_partitioned", 2),
                           ("fused_custom_op", 1)]


def test_every_variant_is_checked_in_the_complete_model():
    assert {v for v, _ in COMPLETE_MODEL_VARIANTS} | {specs.BASELINE_VARIANT} == set(specs.VARIANTS)


@pytest.mark.parametrize("variant,shards", COMPLETE_MODEL_VARIANTS)
def test_variants_train_identically_inside_the_complete_model(small_data, variant, shards):
    """Same data, same seed: a few SGD steps of the traced train step give the same loss and
    the same table as the dense-gradient baseline (a different op path, a dense update)."""
    require_custom_op(variant)
    batches = tensors(small_data, 64, 5)

    def run(variant, shards):
        trainer = build_trainer(ModelSpec(out_dim=6, variant=variant, shards=shards), SMALL.num_features, "/CPU:0")
        losses = [float(trainer.train_step(*b)) for b in batches]
        return losses, trainer.model.kernel.assemble(trainer.model.kernel.tables).numpy()

    ref_losses, ref_table = run(specs.BASELINE_VARIANT, 1)
    losses, table = run(variant, shards)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    np.testing.assert_allclose(table, ref_table, rtol=1e-3, atol=1e-6)
    assert np.abs(table).max() > 0


@pytest.mark.parametrize("variant,shards,optimizer,grad_type,all_rows", [
    ("sparse_dense_matmul", 1, "sgd", "dense", True),
    ("embedding_lookup_sparse", 1, "sgd", "IndexedSlices", False),
    ("embedding_lookup_sparse_fast", 1, "sgd", "IndexedSlices", False),
    ("ragged_embedding_lookup", 1, "sgd", "IndexedSlices", False),
    ("row_partitioned", 2, "sgd", "IndexedSlices", False),
    ("col_partitioned", 2, "sgd", "IndexedSlices", False),
    ("embedding_lookup_sparse", 1, "lazy_adam", "IndexedSlices", False),
    ("embedding_lookup_sparse", 1, "adam", "IndexedSlices", True),  # dense Adam writes every row
    ("fused_custom_op", 1, "sgd", "fused", False),  # no gradient built: the fused update
    ("fused_custom_op", 1, "adagrad", "IndexedSlices", False),  # the op's registered gradient
])
def test_gradient_type_and_rows_touched_are_recorded(small_data, variant, shards, optimizer, grad_type, all_rows):
    require_custom_op(variant)
    trainer = build_trainer(ModelSpec(out_dim=4, variant=variant, shards=shards, optimizer=optimizer),
                            SMALL.num_features, "/CPU:0")
    sp, labels = tensors(small_data, 32, 1)[0]
    trainer.train_step(sp, labels)
    assert set(trainer.grad_types.values()) == {grad_type}
    assert len(trainer.grad_types) == shards
    rows = int(trainer.gradient_stats(sp, labels))
    unique_keys = len(np.unique(sp.indices.numpy()[:, 1]))
    assert rows == (SMALL.num_features if all_rows else unique_keys)


def traced_op_types(trainer) -> Counter:
    """The op types of the train step's graph: what the worker times."""
    return Counter(op.type for op in trainer.train_step.get_concrete_function().graph.get_operations())


def test_the_fast_lookup_is_a_different_graph_where_it_is_measured():
    plain, fast = (traced_op_types(build_trainer(ModelSpec(out_dim=4, variant=v), SMALL.num_features, "/CPU:0"))
                   for v in ("embedding_lookup_sparse", "embedding_lookup_sparse_fast"))
    assert plain["Unique"] >= 1 and fast["Unique"] == 0
    assert fast["SegmentSum"] >= 1


def test_tensorflows_fast_lookup_flag_changes_nothing_in_a_traced_function():
    """Why embedding_lookup_sparse_fast builds its own ops: with a variable table, TF's
    allow_fast_lookup=True gives the very graph of the plain lookup. If a TensorFlow
    release changes that, this test says so."""
    table = tf.Variable(tf.zeros([SMALL.num_features, 4]))

    def graph(allow_fast_lookup):
        @tf.function(input_signature=[tf.SparseTensorSpec([None, SMALL.num_features], tf.float32)])
        def lookup(sp):
            ids = tf.SparseTensor(sp.indices, sp.indices[:, 1], sp.dense_shape)
            return tf.nn.embedding_lookup_sparse(table, ids, sp, combiner="sum", allow_fast_lookup=allow_fast_lookup)

        return Counter(op.type for op in lookup.get_concrete_function().graph.get_operations())

    assert graph(True) == graph(False)


def test_hogwild_threads_share_the_variables(small_data):
    trainer = build_trainer(ModelSpec(out_dim=4), SMALL.num_features, "/CPU:0")
    batches = tensors(small_data, 32, 8)
    run = run_hogwild(trainer.train_step, batches, workers=4, steps_per_worker=5)
    assert run.steps == 20 and len(run.step_seconds) == 20
    assert len(run.last_results) == 4 and all(np.isfinite(float(r)) for r in run.last_results)
    assert int(trainer.optimizer.iterations.numpy()) == 20
    assert float(tf.reduce_max(tf.abs(trainer.model.kernel.tables[0]))) > 0


def test_hogwild_reraises_a_worker_error():
    def step(x):
        if x == 3:
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        run_hogwild(step, [(i,) for i in range(4)], workers=2, steps_per_worker=2)


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="this machine has a GPU")
def test_asking_for_a_missing_gpu_raises_a_typed_error():
    with pytest.raises(NoGPUError, match="no GPU"):
        resolve_device("gpu")
    assert resolve_device("cpu") == "/CPU:0"


def test_spec_validation_names_the_key():
    with pytest.raises(specs.ConfigError, match="^shards:"):
        ModelSpec(variant="embedding_lookup_sparse", shards=2).validate()
    with pytest.raises(specs.ConfigError, match="^optimizer:"):
        ModelSpec(optimizer="rmsprop").validate()


def _ancestors(op) -> set:
    """Every op `op` waits for, through its data and control inputs."""
    seen, todo = set(), [op]
    while todo:
        current = todo.pop()
        for parent in [t.op for t in current.inputs] + list(current.control_inputs):
            if parent not in seen:
                seen.add(parent)
                todo.append(parent)
    return seen


@pytest.mark.parametrize("variant", ["sparse_dense_matmul", "embedding_lookup_sparse", "row_partitioned",
                                     "fused_custom_op"])
@pytest.mark.parametrize("optimizer", ["sgd", "lazy_adam"])
def test_no_read_of_a_table_outlives_its_update_in_the_traced_step(small_data, variant, optimizer):
    """An update that runs while a read value of its table is still waiting for a consumer
    finds the buffer shared and copies the whole table first: in 1 process in 4 the
    executor ordered sdm's gradient gather after the table's update and the step copied its
    4 MB table every time. In the traced train step the worker times, every consumer of a
    table's read value must come before each update of that table."""
    require_custom_op(variant)
    shards = 2 if variant == "row_partitioned" else 1
    trainer = build_trainer(ModelSpec(variant=variant, optimizer=optimizer, out_dim=4, shards=shards),
                            SMALL.num_features, "/CPU:0")
    sp, labels = tensors(small_data, 64, 1)[0]
    function = trainer.train_step.get_concrete_function(sp, labels)
    graph = function.graph
    inside = {id(outer): inner for outer, inner in graph.captures}
    tables = {inside[id(table.handle)].ref() for table in trainer.model.kernel.tables if id(table.handle) in inside}
    assert tables, "the traced step captures no table"
    readers: dict = {}  # a table's handle inside the graph -> the ops consuming a read value of it
    updates: dict = {}
    for op in graph.get_operations():
        handles = [t.ref() for t in op.inputs if t.ref() in tables]
        if not handles:
            continue
        if op.type == "ReadVariableOp":
            readers.setdefault(handles[0], []).extend(c for out in op.outputs for c in out.consumers())
        elif op.name.startswith("optimizer/"):
            for handle in handles:
                updates.setdefault(handle, []).append(op)
    checked = 0
    for handle, update_ops in updates.items():
        for update in update_ops:
            before = _ancestors(update)
            late = [c.name for c in readers.get(handle, []) if c not in before and c is not update]
            assert not late, f"{update.name} ({update.type}) may run before {late[:3]} consume their read of its table"
            checked += 1
    assert checked > 0
