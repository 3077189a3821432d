"""Optimizers: lazy Adam is lazy, dense Adam is dense, every rule agrees with its reference."""

import numpy as np
import pytest
import tensorflow as tf

from sparsebench.errors import ConfigError
from sparsebench.plan import spec
from sparsebench.train.model.optimizers import REGISTRY, build_optimizer

ROWS, COLS = 10, 3
TOUCHED = [1, 4, 4, 7]  # row 4 appears twice: its slices must be summed


def sparse_grad(rng, rows=TOUCHED):
    values = tf.constant(rng.normal(size=(len(rows), COLS)).astype(np.float32))
    return tf.IndexedSlices(values, tf.constant(rows, tf.int64), tf.constant([ROWS, COLS], tf.int64))


def fresh_var(rng):
    return tf.Variable(rng.normal(size=(ROWS, COLS)).astype(np.float32))


def test_registry_and_spec_agree():
    assert set(REGISTRY) == set(spec.OPTIMIZERS)
    with pytest.raises(ConfigError, match="^optimizer:"):
        build_optimizer("rmsprop", 0.1)


def test_lazy_adam_leaves_untouched_rows_bit_identical_and_matches_adam_on_first_step():
    rng = np.random.default_rng(1)
    init = fresh_var(rng).numpy()
    grad = sparse_grad(rng)
    lazy_var, dense_var = tf.Variable(init), tf.Variable(init)
    lazy, dense = build_optimizer("lazy_adam", 0.1), build_optimizer("adam", 0.1)
    lazy.build([lazy_var])
    dense.build([dense_var])
    # Put non-zero moments everywhere first, so "untouched" means something.
    for slot in ("m", "v"):
        lazy.slots(lazy_var)[slot].assign(np.abs(rng.normal(size=(ROWS, COLS))).astype(np.float32))
    moments_before = {k: v.numpy().copy() for k, v in lazy.slots(lazy_var).items()}

    lazy.apply([(grad, lazy_var)])
    untouched = [r for r in range(ROWS) if r not in TOUCHED]
    np.testing.assert_array_equal(lazy_var.numpy()[untouched], init[untouched])
    for name, before in moments_before.items():
        np.testing.assert_array_equal(lazy.slots(lazy_var)[name].numpy()[untouched], before[untouched])

    # First step from zero moments: lazy and dense Adam agree on the touched rows.
    lazy_var.assign(init)
    lazy2 = build_optimizer("lazy_adam", 0.1)
    lazy2.build([lazy_var])
    lazy2.apply([(grad, lazy_var)])
    dense.apply([(grad, dense_var)])
    touched = sorted(set(TOUCHED))
    np.testing.assert_allclose(lazy_var.numpy()[touched], dense_var.numpy()[touched], rtol=1e-5, atol=1e-6)
    assert not np.allclose(lazy_var.numpy()[touched], init[touched])


@pytest.mark.parametrize("name,moves", [("adam", True), ("lazy_adam", False)])
def test_only_dense_adam_moves_rows_absent_from_the_current_batch(name, moves):
    rng = np.random.default_rng(2)
    var = fresh_var(rng)
    opt = build_optimizer(name, 0.1)
    opt.build([var])
    opt.apply([(sparse_grad(rng, [0, 2]), var)])  # gives rows 0 and 2 momentum
    before = var.numpy().copy()
    opt.apply([(sparse_grad(rng, [5]), var)])
    assert (not np.array_equal(var.numpy()[[0, 2]], before[[0, 2]])) == moves


def numpy_reference(name, w, g, lr, state, rows=None):
    """One step of each rule, written out in NumPy. `rows`: the rows a lazy update touches
    (None: every row); the other rows and their moments stay as they are."""
    if name == "sgd":
        return w - lr * g
    if name in ("adam", "lazy_adam"):
        b1, b2, eps, t = 0.9, 0.999, 1e-7, state["t"]
        rows = slice(None) if rows is None else rows
        m, v, w = state["m"].copy(), state["v"].copy(), w.copy()
        m[rows] = b1 * m[rows] + (1 - b1) * g[rows]
        v[rows] = b2 * v[rows] + (1 - b2) * g[rows] * g[rows]
        lr_t = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
        w[rows] = w[rows] - lr_t * m[rows] / (np.sqrt(v[rows]) + eps)
        state["m"], state["v"] = m, v
        return w
    if name == "adagrad":
        state["accum"] = state["accum"] + g * g
        return w - lr * g / (np.sqrt(state["accum"]) + 1e-7)
    if name == "ftrl":  # l1 = l2 = 0, lr_power = -0.5
        accum_new = state["accum"] + g * g
        sigma = (np.sqrt(accum_new) - np.sqrt(state["accum"])) / lr
        state["linear"] = state["linear"] + g - sigma * w
        state["accum"] = accum_new
        return -state["linear"] / (np.sqrt(accum_new) / lr)
    raise AssertionError(name)


@pytest.mark.parametrize("name", spec.OPTIMIZERS)
@pytest.mark.parametrize("sparse", [False, True])
def test_rule_matches_numpy_reference(name, sparse):
    """Three steps on the same rows; every row is checked (untouched ones too). Lazy Adam
    on a sparse gradient updates only the touched rows and their moments."""
    rng = np.random.default_rng(3)
    var = fresh_var(rng)
    w = var.numpy().astype(np.float64)
    zeros = np.zeros_like(w)
    state = {"m": zeros, "v": zeros, "accum": np.full_like(w, 0.1), "linear": -w * np.sqrt(0.1) / 0.05}
    opt = build_optimizer(name, 0.05)
    opt.build([var])
    touched = sorted(set(TOUCHED))
    lazy_rows = touched if (sparse and name == "lazy_adam") else None
    for t in (1, 2, 3):
        grad = sparse_grad(rng)
        dense_g = tf.convert_to_tensor(grad).numpy().astype(np.float64)
        opt.apply([(grad if sparse else tf.convert_to_tensor(grad), var)])
        state["t"] = t
        w = numpy_reference(name, w, dense_g, 0.05, state, rows=lazy_rows)
        np.testing.assert_allclose(var.numpy(), w, rtol=2e-5, atol=2e-6)
    assert int(opt.iterations.numpy()) == 3


def test_lazy_and_dense_adam_differ_after_the_first_step():
    """The reference above would not tell lazy from dense Adam if they agreed: they must not
    (untouched rows keep old momentum under dense Adam)."""
    rng = np.random.default_rng(4)
    init = fresh_var(rng).numpy()
    results = {}
    for name in ("adam", "lazy_adam"):
        var = tf.Variable(init)
        opt = build_optimizer(name, 0.05)
        opt.build([var])
        grads = np.random.default_rng(5)
        opt.apply([(sparse_grad(grads, [0, 1]), var)])
        opt.apply([(sparse_grad(grads, [1, 4, 4]), var)])
        results[name] = var.numpy()
    assert not np.allclose(results["adam"][0], results["lazy_adam"][0])
