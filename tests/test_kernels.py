"""Every kernel variant computes the same function as a dense tf.matmul reference."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import require_custom_op

from sparsebench.errors import ConfigError
from sparsebench.plan import spec
from sparsebench.train.model.kernels import REGISTRY, build_kernel

NUM_FEATURES = 37  # not a multiple of any shard count below: uneven div shards
OUT_DIM = 6

CONFIGS = (
    [("sparse_dense_matmul", 1, "mod"), ("embedding_lookup_sparse", 1, "mod"), ("embedding_lookup_sparse_fast", 1, "mod"),
     ("ragged_embedding_lookup", 1, "mod")]
    + [("row_partitioned", p, s) for p in (1, 2, 3, 4, 8) for s in ("mod", "div")]
    + [("col_partitioned", p, "mod") for p in (1, 2, 4, 6)]
    + [("fused_custom_op", 1, "mod")]
)


def make_batch():
    """5 rows: row 1 and the last row (4) are empty; row 2 repeats key 7 twice."""
    indices = np.array([[0, 0], [0, 5], [0, 36], [2, 7], [2, 7], [2, 20], [3, 1], [3, 36]], dtype=np.int64)
    values = np.array([1.5, -2.0, 0.25, 3.0, 0.5, 1.0, -1.0, 2.0], dtype=np.float32)
    return tf.SparseTensor(indices, values, [5, NUM_FEATURES])


def dense_reference(sp, weights, upstream):
    """Forward and gradients of sum(out * upstream) via a dense matrix (duplicates summed)."""
    dense_x = tf.scatter_nd(sp.indices, sp.values, sp.dense_shape)
    values = tf.Variable(sp.values)
    w = tf.Variable(weights)
    with tf.GradientTape() as tape:
        x = tf.scatter_nd(sp.indices, values, sp.dense_shape)
        out = tf.matmul(x, w)
        loss = tf.reduce_sum(out * upstream)
    grad_w, grad_values = tape.gradient(loss, [w, values])
    return tf.matmul(dense_x, weights).numpy(), grad_w.numpy(), grad_values.numpy()


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize("variant,shards,strategy", CONFIGS)
def test_variant_matches_dense_reference(variant, shards, strategy, traced):
    """Eagerly and in a traced function (where the worker times it: TensorFlow takes some
    paths only eagerly), forward and gradients match the dense reference."""
    require_custom_op(variant)
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(NUM_FEATURES, OUT_DIM)).astype(np.float32)
    upstream = rng.normal(size=(5, OUT_DIM)).astype(np.float32)
    sp = make_batch()
    want_out, want_grad_w, want_grad_values = dense_reference(sp, weights, upstream)

    kernel = build_kernel(variant, NUM_FEATURES, OUT_DIM, shards, strategy)
    assert len(kernel.tables) == shards
    kernel.assign_full(weights)
    np.testing.assert_array_equal(kernel.assemble(kernel.tables).numpy(), weights)
    values = tf.Variable(sp.values)

    def forward_and_gradients(indices, dense_shape):
        with tf.GradientTape() as tape:
            out = kernel(tf.SparseTensor(indices, values, dense_shape))
            loss = tf.reduce_sum(out * upstream)
        grads = tape.gradient(loss, [*kernel.tables, values])
        return out, [tf.convert_to_tensor(g) for g in grads]

    if traced:
        forward_and_gradients = tf.function(forward_and_gradients, input_signature=[
            tf.TensorSpec([None, 2], tf.int64), tf.TensorSpec([2], tf.int64)])
    out, (*grad_tables, grad_values) = forward_and_gradients(sp.indices, sp.dense_shape)

    assert out.shape == (5, OUT_DIM), "empty trailing rows must be kept"
    np.testing.assert_allclose(out.numpy(), want_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out.numpy()[[1, 4]], 0.0)
    got_grad_w = kernel.assemble(grad_tables).numpy()
    np.testing.assert_allclose(got_grad_w, want_grad_w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad_values.numpy(), want_grad_values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", spec.VARIANTS)
def test_gradient_type(variant):
    require_custom_op(variant)
    want = tf.Tensor if variant == spec.BASELINE_VARIANT else tf.IndexedSlices
    kernel = build_kernel(variant, NUM_FEATURES, OUT_DIM, 2 if "partitioned" in variant else 1)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(kernel(make_batch()))
    for grad in tape.gradient(loss, kernel.tables):
        assert isinstance(grad, want)


def test_row_partition_strategies_place_keys_as_tensorflow_does():
    mod = build_kernel("row_partitioned", 10, 2, 3, "mod")
    div = build_kernel("row_partitioned", 10, 2, 3, "div")
    keys = tf.range(10, dtype=tf.int64)
    shard, local = mod.shard_of(keys)
    assert shard.numpy().tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    assert local.numpy().tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    shard, local = div.shard_of(keys)  # TF's div: sizes 4, 3, 3
    assert shard.numpy().tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert local.numpy().tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2]
    assert [t.shape[0] for t in div.tables] == [4, 3, 3]


def test_registry_and_spec_agree():
    assert tuple(REGISTRY) == spec.VARIANTS


@pytest.mark.parametrize(
    "args,key",
    [(("nope", 8, 2, 1), "variant"), (("sparse_dense_matmul", 8, 2, 2), "shards"),
     (("col_partitioned", 8, 2, 3), "shards"), (("row_partitioned", 8, 2, 2, "hash"), "partition_strategy")],
)
def test_bad_kernel_settings_name_the_key(args, key):
    with pytest.raises(ConfigError, match=f"^{key}:"):
        build_kernel(*args)
