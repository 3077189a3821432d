"""Optimizers written against TensorFlow's resource ops, sparse-aware and measurable.

Why not Keras: Keras 3 `Adam` densifies `IndexedSlices` (every step touches the whole
table) and is wrong when a gradient repeats a row id; tensorflow-addons' LazyAdam no
longer imports. The benchmark must know exactly what each
optimizer does with a sparse gradient, so we own the update rules:

- `sgd`: dense `assign_sub`; sparse `scatter_sub` (repeated ids accumulate).
- `adam`: always dense. An `IndexedSlices` gradient is converted to a dense tensor first
  and moments decay over the whole table: the cost this variant exists to show.
- `lazy_adam`: with an `IndexedSlices` gradient, only the rows present are touched: ids
  are deduplicated and their slices summed, then m, v and the weights of those rows are
  gathered, updated and scattered back; other rows and their moments stay bit-identical.
  With a dense gradient it is plain Adam.
- `adagrad`, `ftrl`: TensorFlow's fused `ResourceSparseApply*` kernels on deduplicated
  slices, and `ResourceApply*` for dense gradients. FTRL's `linear` slot starts where it
  reproduces the variable's initial value (stock FTRL starts it at zero, which zeroes a
  randomly initialized dense head on the first step).

All Adam updates use the same formula (TensorFlow's `ApplyAdam`): with t = step + 1,
`lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t)`, `m = b1 m + (1-b1) g`, `v = b2 v + (1-b2) g^2`,
`w -= lr_t * m / (sqrt(v) + eps)`. So lazy and dense Adam agree on touched rows at step 1.

Slots are created eagerly by `build` (never inside a `tf.function`) and the step counter
is shared by all variables of one optimizer.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import tensorflow as tf

from ...errors import ConfigError


def dedupe(grad: tf.IndexedSlices) -> tuple[tf.Tensor, tf.Tensor]:
    """(unique row ids, summed slices) of an IndexedSlices gradient."""
    unique_ids, position = tf.unique(grad.indices)
    summed = tf.math.unsorted_segment_sum(grad.values, position, tf.shape(unique_ids)[0])
    return unique_ids, summed


class Optimizer:
    """Base: dispatches each gradient to its dense or sparse rule."""

    name = ""
    densifies = False  # True: sparse gradients are applied as dense ones (every row written)
    fused = False  # True: `apply_fused` updates the fused custom op's table from its output gradient

    def __init__(self, learning_rate: float):
        self.learning_rate = float(learning_rate)
        self.iterations = tf.Variable(0, dtype=tf.int64, trainable=False, name="iterations")
        self._slots: dict = {}

    def build(self, variables: Iterable[tf.Variable]) -> None:
        for var in variables:
            if var.ref() not in self._slots:
                self._slots[var.ref()] = self._make_slots(var)

    def _make_slots(self, var: tf.Variable) -> dict[str, tf.Variable]:
        return {}

    def _zeros_like(self, var, name, value=0.0):
        """A slot beside `var`: under a parameter-server strategy, on `var`'s PS task (not
        wherever round-robin placement would put it), so an update never crosses tasks."""
        placement = (tf.distribute.get_strategy().extended.colocate_vars_with(var) if tf.distribute.has_strategy()
                     else contextlib.nullcontext())
        with placement:
            return tf.Variable(tf.fill(var.shape, tf.constant(value, var.dtype)), trainable=False, name=f"{name}")

    def slots(self, var: tf.Variable) -> dict[str, tf.Variable]:
        return self._slots[var.ref()]

    def slot_variables(self) -> list[tf.Variable]:
        return [slot for slots in self._slots.values() for slot in slots.values()]

    def apply(self, grads_and_vars: Iterable[tuple], wait_for: dict | None = None) -> None:
        """Apply each gradient to its variable; `wait_for`: variable ref -> tensors its
        update must wait for (control dependencies)."""
        wait_for = wait_for or {}
        for grad, var in grads_and_vars:
            if grad is None:
                continue
            if var.ref() not in self._slots:
                raise ConfigError(f"optimizer {self.name}: variable {var.name} was not built")
            with tf.control_dependencies(wait_for.get(var.ref(), [])):
                if isinstance(grad, tf.IndexedSlices):
                    self._apply_sparse(grad, var, self._slots[var.ref()])
                else:
                    self._apply_dense(grad, var, self._slots[var.ref()])
        self.iterations.assign_add(1)

    def _apply_dense(self, grad, var, slots):
        raise NotImplementedError

    def _apply_sparse(self, grad, var, slots):
        raise NotImplementedError

    def apply_fused(self, table, bias_x, rows, keys, normalized, grad_out) -> None:
        """Update the fused op's table (and bias_x) straight from the layer's output gradient."""
        raise ConfigError(f"optimizer {self.name}: has no fused update")

    def rows_touched(self, grad, var: tf.Variable) -> tf.Tensor:
        """How many rows of `var` this optimizer's update of `grad` writes: the distinct
        ids of a sparse gradient, every row of a dense one or of a densifying optimizer."""
        if isinstance(grad, tf.IndexedSlices) and not self.densifies:
            return tf.size(tf.unique(grad.indices).y, out_type=tf.int64)
        return tf.constant(var.shape[0], tf.int64)


class SGD(Optimizer):
    name = "sgd"
    fused = True

    def apply_fused(self, table, bias_x, rows, keys, normalized, grad_out):
        from ..custom_ops.ops import fused_sgd

        fused_sgd(table, bias_x, rows, keys, normalized, grad_out, self.learning_rate)

    def _apply_dense(self, grad, var, slots):
        # The fused kernel makes one pass over the (possibly 2**20-row) gradient; an
        # assign_sub(lr * grad) would materialize lr * grad first.
        tf.raw_ops.ResourceApplyGradientDescent(var=var.handle, alpha=tf.cast(self.learning_rate, var.dtype), delta=grad)

    def _apply_sparse(self, grad, var, slots):
        var.scatter_sub(tf.IndexedSlices(self.learning_rate * grad.values, grad.indices, grad.dense_shape))


class Adam(Optimizer):
    """Dense Adam: sparse gradients are densified first."""

    name = "adam"
    densifies = True  # moments decay on every row, whatever the gradient

    def __init__(self, learning_rate, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
        super().__init__(learning_rate)
        self.beta_1, self.beta_2, self.epsilon = beta_1, beta_2, epsilon

    def _make_slots(self, var):
        return {"m": self._zeros_like(var, "m"), "v": self._zeros_like(var, "v")}

    def _powers(self, dtype):
        t = tf.cast(self.iterations + 1, dtype)
        return tf.pow(tf.cast(self.beta_1, dtype), t), tf.pow(tf.cast(self.beta_2, dtype), t)

    def _apply_dense(self, grad, var, slots):
        beta_1_power, beta_2_power = self._powers(var.dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=var.handle,
            m=slots["m"].handle,
            v=slots["v"].handle,
            beta1_power=beta_1_power,
            beta2_power=beta_2_power,
            lr=tf.cast(self.learning_rate, var.dtype),
            beta1=tf.cast(self.beta_1, var.dtype),
            beta2=tf.cast(self.beta_2, var.dtype),
            epsilon=tf.cast(self.epsilon, var.dtype),
            grad=grad,
        )

    def _apply_sparse(self, grad, var, slots):
        self._apply_dense(tf.convert_to_tensor(grad), var, slots)


class LazyAdam(Adam):
    """Adam that touches only the rows present in an IndexedSlices gradient."""

    name = "lazy_adam"
    densifies = False
    fused = True

    def apply_fused(self, table, bias_x, rows, keys, normalized, grad_out):
        from ..custom_ops.ops import fused_lazy_adam

        beta_1_power, beta_2_power = self._powers(tf.float32)
        table_slots = self.slots(table)
        bias_slots = self.slots(bias_x) if bias_x is not None else {"m": None, "v": None}
        fused_lazy_adam(table, table_slots["m"], table_slots["v"], bias_x, bias_slots["m"], bias_slots["v"], rows, keys,
                        normalized, grad_out, self.learning_rate, self.beta_1, self.beta_2, self.epsilon,
                        beta_1_power, beta_2_power)

    def _apply_sparse(self, grad, var, slots):
        ids, g = dedupe(grad)
        beta_1_power, beta_2_power = self._powers(var.dtype)
        lr_t = self.learning_rate * tf.sqrt(1.0 - beta_2_power) / (1.0 - beta_1_power)
        m_rows = self.beta_1 * tf.gather(slots["m"], ids) + (1.0 - self.beta_1) * g
        v_rows = self.beta_2 * tf.gather(slots["v"], ids) + (1.0 - self.beta_2) * tf.square(g)
        slots["m"].scatter_update(tf.IndexedSlices(m_rows, ids))
        slots["v"].scatter_update(tf.IndexedSlices(v_rows, ids))
        var.scatter_sub(tf.IndexedSlices(lr_t * m_rows / (tf.sqrt(v_rows) + self.epsilon), ids))


class Adagrad(Optimizer):
    name = "adagrad"

    def __init__(self, learning_rate, initial_accumulator_value=0.1, epsilon=1e-7):
        super().__init__(learning_rate)
        self.initial_accumulator_value, self.epsilon = initial_accumulator_value, epsilon

    def _make_slots(self, var):
        return {"accum": self._zeros_like(var, "accum", self.initial_accumulator_value)}

    def _apply_dense(self, grad, var, slots):
        tf.raw_ops.ResourceApplyAdagradV2(
            var=var.handle,
            accum=slots["accum"].handle,
            lr=tf.cast(self.learning_rate, var.dtype),
            epsilon=tf.cast(self.epsilon, var.dtype),
            grad=grad,
        )

    def _apply_sparse(self, grad, var, slots):
        ids, g = dedupe(grad)
        tf.raw_ops.ResourceSparseApplyAdagradV2(
            var=var.handle,
            accum=slots["accum"].handle,
            lr=tf.cast(self.learning_rate, var.dtype),
            epsilon=tf.cast(self.epsilon, var.dtype),
            grad=g,
            indices=ids,
        )


class Ftrl(Optimizer):
    name = "ftrl"

    def __init__(self, learning_rate, initial_accumulator_value=0.1, l1=0.0, l2=0.0, lr_power=-0.5):
        super().__init__(learning_rate)
        self.initial_accumulator_value = initial_accumulator_value
        self.l1, self.l2, self.lr_power = l1, l2, lr_power

    def _make_slots(self, var):
        # FTRL's weight is a function of its state: w = -linear * lr / sqrt(accum) (with
        # l1 = l2 = 0). A zero `linear` would reset every weight to ~0 on the first step,
        # wiping the dense head's random initialization and leaving a dead network; start
        # `linear` where that formula gives back the initial weights.
        accum = self._zeros_like(var, "accum", self.initial_accumulator_value)
        linear = tf.Variable(
            -var * tf.sqrt(accum) / self.learning_rate, trainable=False, name="linear"
        )
        return {"accum": accum, "linear": linear}

    def _hyper(self, dtype):
        return dict(
            lr=tf.cast(self.learning_rate, dtype),
            l1=tf.cast(self.l1, dtype),
            l2=tf.cast(self.l2, dtype),
            lr_power=tf.cast(self.lr_power, dtype),
        )

    def _apply_dense(self, grad, var, slots):
        tf.raw_ops.ResourceApplyFtrl(
            var=var.handle, accum=slots["accum"].handle, linear=slots["linear"].handle, grad=grad, **self._hyper(var.dtype)
        )

    def _apply_sparse(self, grad, var, slots):
        ids, g = dedupe(grad)
        tf.raw_ops.ResourceSparseApplyFtrl(
            var=var.handle,
            accum=slots["accum"].handle,
            linear=slots["linear"].handle,
            grad=g,
            indices=ids,
            **self._hyper(var.dtype),
        )


REGISTRY: dict[str, type[Optimizer]] = {cls.name: cls for cls in (SGD, Adam, LazyAdam, Adagrad, Ftrl)}


def build_optimizer(name: str, learning_rate: float) -> Optimizer:
    if name not in REGISTRY:
        raise ConfigError(f"optimizer: unknown optimizer {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name](learning_rate)
