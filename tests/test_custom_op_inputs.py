"""The fused ops never trust their inputs, write variables as TensorFlow's sparse updates
do, and never lower a maximum.

Every bad input of the four ops (a negative row, shapes that disagree, a non-scalar or
negative batch size, a batch of 2^31 entries) is an `InvalidArgumentError` naming the
input, after which the same process runs a good call; a tensor read from a variable
before an op writes it keeps its values (copy-on-read, as `EnsureSparseVariableAccess`);
concurrent Hogwild steps never lower the normalization's maximum.
"""

import threading

import numpy as np
import pytest
from conftest import require_custom_op

KEYS, COLS = 8, 2


@pytest.fixture(scope="module")
def tf():
    require_custom_op()
    import tensorflow as tf

    return tf


@pytest.fixture
def ops(tf):
    from sparsebench.train.custom_ops import ops

    return ops


def variables(tf):
    return {"table": tf.Variable(tf.fill([KEYS, COLS], 0.5)), "bias": tf.Variable(tf.zeros([KEYS])),
            "max": tf.Variable(tf.zeros([KEYS])), "m": tf.Variable(tf.zeros([KEYS, COLS])),
            "v": tf.Variable(tf.zeros([KEYS, COLS])), "bm": tf.Variable(tf.zeros([KEYS])),
            "bv": tf.Variable(tf.zeros([KEYS]))}


def call(tf, ops, which, var, rows, keys, values=None, batch_size=None, normalized=None, grad_out=None, lr=0.1):
    """One op (`forward`, `grad`, `sgd` or `lazy_adam`) on the variables of `var`."""
    i64 = lambda x: tf.constant(x, tf.int64) if not isinstance(x, tf.Tensor) else x  # noqa: E731
    rows, keys = i64(rows), i64(keys)
    if which == "forward":
        values = tf.ones_like(rows, tf.float32) if values is None else tf.constant(values, tf.float32)
        return ops.fused_layer(var["table"], rows, keys, values, 2 if batch_size is None else batch_size,
                               var["bias"], var["max"])
    normalized = tf.ones_like(rows, tf.float32) if normalized is None else tf.constant(normalized, tf.float32)
    grad_out = tf.ones([2, COLS]) if grad_out is None else grad_out
    if which == "grad":
        return ops._ops().sparsebench_fused_layer_grad(table=var["table"].handle, rows=rows, keys=keys,
                                                       normalized=normalized, grad_out=grad_out)
    if which == "sgd":
        return ops.fused_sgd(var["table"], var["bias"], rows, keys, normalized, grad_out, lr)
    return ops.fused_lazy_adam(var["table"], var["m"], var["v"], var["bias"], var["bm"], var["bv"], rows, keys,
                               normalized, grad_out, lr, 0.9, 0.999, 1e-7, 0.9, 0.999)


ALL_OPS = ["forward", "grad", "sgd", "lazy_adam"]


def assert_alive(tf, ops):
    """The process still runs a good call of every op after a refused one."""
    var = variables(tf)
    for which in ALL_OPS:
        call(tf, ops, which, var, [0, 1], [1, 2])
    assert float(var["max"][1]) == 1.0


def refused(tf, match, fn):
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
        fn()


@pytest.mark.parametrize("which", ALL_OPS)
def test_a_negative_row_is_refused_naming_it(tf, ops, which):
    var = variables(tf)
    before = var["table"].numpy().copy()
    refused(tf, r"rows\[0\] = -1 is not in \[0, 2\)", lambda: call(tf, ops, which, var, [-1, 0], [1, 2]))
    refused(tf, r"rows\[1\] = 5 is not in \[0, 2\)", lambda: call(tf, ops, which, var, [0, 5], [1, 2]))
    refused(tf, r"keys\[1\] = -3 is not in \[0, 8\)", lambda: call(tf, ops, which, var, [0, 1], [1, -3]))
    np.testing.assert_array_equal(var["table"].numpy(), before)  # nothing written before the check
    assert float(tf.reduce_max(var["max"])) == 0.0
    assert_alive(tf, ops)


def test_the_first_bad_entry_is_named_whatever_the_threads_find_first(tf, ops):
    """Entries are checked in parallel; the message names the lowest bad index."""
    var = variables(tf)
    keys = np.ones(200_000, np.int64)
    keys[[150_000, 77_777, 190_000]] = 99
    refused(tf, r"keys\[77777\] = 99", lambda: call(tf, ops, "forward", var, np.zeros(200_000, np.int64), keys,
                                                    batch_size=1))


@pytest.mark.parametrize("which", ALL_OPS)
def test_shapes_that_disagree_are_refused_naming_the_input(tf, ops, which):
    var = variables(tf)
    refused(tf, r"keys must be a vector as long as rows \(2\)", lambda: call(tf, ops, which, var, [0, 1], [1, 2, 3]))
    refused(tf, r"rows must be a vector", lambda: call(tf, ops, which, var, [[0, 1]], [1, 2]))
    if which == "forward":
        refused(tf, r"values must have one entry per entry of rows \(2\)",
                lambda: call(tf, ops, which, var, [0, 1], [1, 2], values=[1.0, 2.0, 3.0]))
    else:
        refused(tf, r"normalized must have one entry per entry of rows \(2\)",
                lambda: call(tf, ops, which, var, [0, 1], [1, 2], normalized=[1.0]))
        refused(tf, r"grad_out must be \[batch_size, 2\], got shape \[2,3\]",
                lambda: call(tf, ops, which, var, [0, 1], [1, 2], grad_out=tf.ones([2, 3])))
        # grad_out's rows are the batch: a row past them is refused, not read
        refused(tf, r"rows\[1\] = 1 is not in \[0, 1\)",
                lambda: call(tf, ops, which, var, [0, 1], [1, 2], grad_out=tf.ones([1, COLS])))
    assert_alive(tf, ops)


@pytest.mark.parametrize("which", ["forward", "sgd", "lazy_adam"])
def test_variables_of_the_wrong_shape_are_refused_naming_them(tf, ops, which):
    var = variables(tf)
    var["bias"] = tf.Variable(tf.zeros([KEYS - 1]))
    refused(tf, r"bias_x: variable must have shape \[8\], got \[7\]", lambda: call(tf, ops, which, var, [0, 1], [1, 2]))
    if which == "lazy_adam":
        var = variables(tf)
        var["v"] = tf.Variable(tf.zeros([KEYS, COLS + 1]))
        refused(tf, r"table_v: variable must have shape \[8, 2\], got \[8,3\]",
                lambda: call(tf, ops, which, var, [0, 1], [1, 2]))
    assert_alive(tf, ops)


def test_a_batch_size_that_is_not_a_non_negative_scalar_is_refused(tf, ops):
    var = variables(tf)
    refused(tf, r"batch_size must be a scalar, got shape \[2\]",
            lambda: call(tf, ops, "forward", var, [0, 1], [1, 2], batch_size=tf.constant([2, 2], tf.int64)))
    refused(tf, r"batch_size must be >= 0, got -1", lambda: call(tf, ops, "forward", var, [], [], batch_size=-1))
    refused(tf, r"learning_rate must be a scalar, got shape \[1\]",
            lambda: call(tf, ops, "sgd", var, [0, 1], [1, 2], lr=tf.constant([0.1])))
    refused(tf, r"beta1 must be a scalar",
            lambda: ops._ops().sparsebench_fused_lazy_adam_update(
                table=var["table"].handle, table_m=var["m"].handle, table_v=var["v"].handle, bias_x=var["bias"].handle,
                bias_m=var["bm"].handle, bias_v=var["bv"].handle, rows=tf.constant([0], tf.int64),
                keys=tf.constant([1], tf.int64), normalized=tf.ones([1]), grad_out=tf.ones([1, COLS]),
                learning_rate=0.1, beta1=[0.9], beta2=0.999, epsilon=1e-7, beta1_power=0.9, beta2_power=0.999))
    assert_alive(tf, ops)


def test_a_batch_of_2_31_entries_is_refused_by_its_shape(tf, ops):
    """Entry indices are 32-bit inside the updates. Refused from the shape alone: when a
    traced function is built (nothing allocated), and by the kernel for a tensor whose
    memory is reserved but never written (Empty, init=False)."""
    var = variables(tf)
    traced = tf.function(lambda r: call(tf, ops, "forward", var, r, r, values=[1.0], batch_size=1))
    with pytest.raises(ValueError, match=r"rows has 2147483648 entries; the op indexes entries with 32 bits"):
        traced.get_concrete_function(tf.TensorSpec([2**31], tf.int64))
    huge = tf.reshape(tf.raw_ops.Empty(shape=[2**30, 2], dtype=tf.int64, init=False), tf.constant([2**31], tf.int64))
    refused(tf, r"rows has 2147483648 entries; the op indexes entries with 32 bits \(at most 2147483647\)",
            lambda: call(tf, ops, "forward", var, huge, huge, values=[1.0], batch_size=1))
    del huge
    assert_alive(tf, ops)


# -- variable semantics -----------------------------------------------------------------
def test_a_tensor_read_before_a_write_keeps_its_values(tf, ops):
    """As TensorFlow's sparse updates: the variable goes copy-on-read, so what a reader holds
    is never the buffer the op writes (the forward pass writes max_x, the updates the table)."""
    for which in ("forward", "sgd", "lazy_adam"):
        var = variables(tf)
        maxima, table = var["max"].read_value(), var["table"].read_value()
        call(tf, ops, which, var, [0, 1], [1, 2], values=[5.0, 7.0])
        if which == "forward":
            assert var["max"].numpy()[[1, 2]].tolist() == [5.0, 7.0]
        else:
            assert not np.array_equal(var["table"].numpy(), table.numpy())
        assert float(tf.reduce_max(maxima)) == 0.0 and np.all(table.numpy() == 0.5)
        # after the first write, reads are copies: a later write leaves them alone too
        maxima, table = var["max"].read_value(), var["table"].read_value()
        kept = maxima.numpy().copy(), table.numpy().copy()
        call(tf, ops, which, var, [0, 1], [1, 2], values=[50.0, 70.0])
        np.testing.assert_array_equal(maxima.numpy(), kept[0])
        np.testing.assert_array_equal(table.numpy(), kept[1])


@pytest.mark.slow
def test_concurrent_steps_never_lower_a_maximum(tf, ops):
    """Hogwild: several Python threads run the traced forward pass at once (TensorFlow
    releases the GIL), each raising the same few keys' maxima through rising values. Every
    call's largest value must survive: the final maxima equal the largest value ever sent."""
    keys_count, nnz, threads, calls = 4, 50_000, 4, 30
    var = variables(tf)
    table = tf.Variable(tf.zeros([keys_count, COLS]))
    bias, maxima = tf.Variable(tf.zeros([keys_count])), tf.Variable(tf.zeros([keys_count]))
    keys = tf.constant(np.arange(nnz) % keys_count, tf.int64)
    rows = tf.zeros([nnz], tf.int64)

    @tf.function(input_signature=[tf.TensorSpec([nnz], tf.float32)])
    def step(values):
        return ops.fused_layer(table, rows, keys, values, 1, bias, maxima)[0]

    sent = np.zeros(keys_count)
    lock = threading.Lock()

    def worker(t):
        local = np.zeros(keys_count)
        for c in range(calls):
            # each thread's values rise through the call, interleaved with the others'
            values = (np.arange(nnz) * threads + t + c * nnz * threads).astype(np.float32)
            step(tf.constant(values))
            np.maximum.at(local, np.arange(nnz) % keys_count, values)
        with lock:
            np.maximum(sent, local, out=sent)

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    np.testing.assert_array_equal(maxima.numpy(), sent.astype(np.float32))
    del var
