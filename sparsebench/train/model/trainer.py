"""The complete model every cell trains.

    raw batch -> [percentile discretizer] -> [online max-normalization + per-feature bias]
              -> sparse linear layer h = F(sp @ W + b)  (the kernel variant decides sp @ W)
              -> dense MLP head -> one logit -> sigmoid cross-entropy

Semantics follow twml. Normalization is the vectorized per-batch form: for every entry
present in the batch, `max_x[key] = max(max_x[key], |v|)` is applied for the whole batch
first (a `scatter_max`, so repeated keys are fine), then each entry is divided by the
updated maximum. twml updates entry by entry inside a batch; the per-batch form gives the
same result from the second time a key is seen in a batch onwards and is what runs fast.
At inference the stored maxima are read, never updated.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from ...plan.spec import ModelSpec
from ..inputs.data import SparseBatch
from .kernels import SparseKernel, build_kernel
from .optimizers import Optimizer, build_optimizer

NORM_EPSILON = 1e-5
# Multiplier of the key hash that gives a (feature, bin) pair its new key.
_BIN_HASH_MULTIPLIER = 2654435761


# -- discretizer -----------------------------------------------------------------------
@dataclass(frozen=True)
class Calibration:
    """Percentile bin boundaries for the calibrated (continuous) features."""

    keys: np.ndarray  # int64 [n_calibrated]
    boundaries: np.ndarray  # float32 [n_calibrated, n_bin + 1]

    @property
    def n_bin(self) -> int:
        return self.boundaries.shape[1] - 1


def calibrate(batch: SparseBatch, n_bin: int, min_count: int | None = None) -> Calibration:
    """Per feature: sort its values, take the CDF, and read the values at
    `linspace(0, 1, n_bin + 1)` (linear interpolation between order statistics; every
    example weighs the same). Features whose values are all 1 (binary) or that occur fewer
    than `min_count` times (default `max(2 * n_bin, 10)`) stay uncalibrated.
    """
    min_count = min_count if min_count is not None else max(2 * n_bin, 10)
    order = np.lexsort((batch.values, batch.keys))
    keys, values = batch.keys[order], batch.values[order].astype(np.float64)
    unique_keys, starts, counts = np.unique(keys, return_index=True, return_counts=True)
    continuous = np.zeros(len(unique_keys), dtype=bool)
    np.logical_or.at(continuous, np.searchsorted(unique_keys, keys), values != 1.0)
    chosen = continuous & (counts >= min_count)
    starts, counts = starts[chosen], counts[chosen]
    quantiles = np.linspace(0.0, 1.0, n_bin + 1)
    position = quantiles[None, :] * (counts[:, None] - 1)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, counts[:, None] - 1)
    frac = position - low
    lo_v, hi_v = values[starts[:, None] + low], values[starts[:, None] + high]
    bounds = lo_v + (hi_v - lo_v) * frac
    return Calibration(unique_keys[chosen].astype(np.int64), bounds.astype(np.float32))


class Discretizer(tf.Module):
    """Replaces each calibrated feature's value by a new key for (feature, bin), value 1."""

    def __init__(self, calibration: Calibration, num_features: int):
        super().__init__(name="discretizer")
        self.num_features = num_features
        self.n_bin = calibration.n_bin
        slot = np.full(num_features, -1, dtype=np.int32)
        slot[calibration.keys] = np.arange(len(calibration.keys), dtype=np.int32)
        self.slot = tf.Variable(slot, trainable=False, name="slot")
        # A sentinel row at the end so uncalibrated entries gather something harmless.
        inner = np.concatenate(
            [calibration.boundaries[:, 1:-1], np.zeros((1, self.n_bin - 1), np.float32)], axis=0
        )
        self.inner_boundaries = tf.Variable(inner, trainable=False, name="boundaries")

    def __call__(self, keys: tf.Tensor, values: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        slot = tf.gather(self.slot, keys)
        calibrated = slot >= 0
        safe_slot = tf.where(calibrated, slot, tf.shape(self.inner_boundaries)[0] - 1)
        bounds = tf.gather(self.inner_boundaries, safe_slot)
        bins = tf.searchsorted(bounds, tf.expand_dims(values, 1), side="right")[:, 0]
        pair = (keys * self.n_bin + tf.cast(bins, tf.int64)) % self.num_features
        binned_key = (pair * _BIN_HASH_MULTIPLIER) % self.num_features
        new_keys = tf.where(calibrated, binned_key, keys)
        new_values = tf.where(calibrated, tf.ones_like(values), values)
        return new_keys, new_values


# -- normalization ---------------------------------------------------------------------
class MaxNorm(tf.Module):
    """Online "sparse max norm" with a trainable per-feature bias on present entries."""

    def __init__(self, num_features: int):
        super().__init__(name="max_norm")
        self.max_x = tf.Variable(tf.zeros([num_features]), trainable=False, name="max_x")
        self.bias_x = tf.Variable(tf.zeros([num_features]), name="bias_x")

    def __call__(self, keys: tf.Tensor, values: tf.Tensor, training: bool) -> tf.Tensor:
        if training:
            self.max_x.scatter_max(tf.IndexedSlices(tf.abs(values), keys))
        scale = tf.maximum(tf.gather(self.max_x, keys), NORM_EPSILON)
        return tf.stop_gradient(values / scale) + tf.gather(self.bias_x, keys)


# -- dense head ------------------------------------------------------------------------
_ACTIVATIONS = {"relu": tf.nn.relu, "linear": tf.identity, "sigmoid": tf.sigmoid, "tanh": tf.tanh}


class DenseHead(tf.Module):
    """A small MLP on the sparse layer's output, ending in one logit."""

    def __init__(self, in_dim: int, hidden_units: tuple[int, ...], seed: int):
        super().__init__(name="head")
        rng = np.random.default_rng([seed, 7])
        sizes = [in_dim, *hidden_units, 1]
        self.layers = []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            limit = np.sqrt(6.0 / (fan_in + fan_out))  # Glorot uniform
            kernel = rng.uniform(-limit, limit, size=(fan_in, fan_out)).astype(np.float32)
            self.layers.append(
                (tf.Variable(kernel, name=f"dense_{i}_kernel"), tf.Variable(tf.zeros([fan_out]), name=f"dense_{i}_bias"))
            )

    @property
    def parameters(self) -> list[tf.Variable]:
        """Every layer's kernel and bias, in order."""
        return [variable for layer in self.layers for variable in layer]

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        for i, (kernel, bias) in enumerate(self.layers):
            x = tf.matmul(x, kernel) + bias
            if i < len(self.layers) - 1:
                x = tf.nn.relu(x)
        return tf.squeeze(x, axis=1)


# -- the complete model ----------------------------------------------------------------
class SparseModel(tf.Module):
    def __init__(self, spec: ModelSpec, num_features: int, calibration: Calibration | None = None):
        super().__init__(name="sparse_model")
        spec.validate()
        self.spec = spec
        self.num_features = num_features
        if spec.discretizer and calibration is None:
            raise ValueError("the discretizer needs a calibration")
        self.discretizer = Discretizer(calibration, num_features) if spec.discretizer else None
        self.norm = MaxNorm(num_features) if spec.normalization else None
        self.kernel: SparseKernel = build_kernel(
            spec.variant, num_features, spec.out_dim, spec.shards, spec.partition_strategy
        )
        self.sparse_bias = tf.Variable(tf.fill([spec.out_dim], 1.0 / spec.out_dim), name="sparse_bias")
        self.activation = _ACTIVATIONS[spec.activation]
        self.head = DenseHead(spec.out_dim, spec.hidden_units, spec.seed)

    def is_sparse_table(self, var: tf.Variable) -> bool:
        """Is `var` one of the `[num_features, ...]` weights whose gradient type and rows
        touched are recorded?"""
        return any(var is table for table in self.kernel.tables)

    @property
    def train_variables(self) -> list[tf.Variable]:
        params = [*self.kernel.tables, self.sparse_bias]
        if self.norm is not None:
            params.append(self.norm.bias_x)
        return params + self.head.parameters

    @property
    def dense_variables(self) -> list[tf.Variable]:
        """The variables outside the sparse layer's tables and per-feature bias."""
        return [self.sparse_bias, *self.head.parameters]

    def fused_pre_activation(self, sp: tf.SparseTensor, training: bool, watch: bool = True):
        """For a kernel that fuses the normalization: (sp @ W with the normalization inside,
        each entry's normalized value, the entries' rows and keys). `watch=False`: no
        gradient is built for the table and bias_x."""
        rows, keys, values = sp.indices[:, 0], sp.indices[:, 1], sp.values
        if self.discretizer is not None:
            keys, values = self.discretizer(keys, values)
        bias_x = self.norm.bias_x if self.norm is not None else None
        max_x = self.norm.max_x if self.norm is not None else None
        out, normalized = self.kernel.fused(rows, keys, values, sp.dense_shape[0], bias_x, max_x, training, watch)
        return out, normalized, rows, keys

    def sparse_layer(self, sp: tf.SparseTensor, training: bool) -> tf.Tensor:
        if self.kernel.fuses_normalization:
            return self.activation(self.fused_pre_activation(sp, training)[0] + self.sparse_bias)
        keys, values = sp.indices[:, 1], sp.values
        if self.discretizer is not None:
            keys, values = self.discretizer(keys, values)
        if self.norm is not None:
            values = self.norm(keys, values, training)
        indices = tf.stack([sp.indices[:, 0], keys], axis=1)
        prepared = tf.SparseTensor(indices, values, sp.dense_shape)
        return self.activation(self.kernel(prepared) + self.sparse_bias)

    def __call__(self, sp: tf.SparseTensor, training: bool = False) -> tf.Tensor:
        return self.head(self.sparse_layer(sp, training))


def loss_fn(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits))


# -- batches as tensors ----------------------------------------------------------------
def batch_signature(num_features: int):
    """The tf.function signature that lets batches of any size and nnz share one trace."""
    return [tf.SparseTensorSpec([None, num_features], tf.float32), tf.TensorSpec([None], tf.float32)]


# -- training --------------------------------------------------------------------------
def gradient_tensors(grads) -> list[tf.Tensor]:
    """Every tensor of the step's gradients, for a control dependency of a table's update
    on all of them (`Trainer._train_step`, kernels that read the whole table).

    Automatic control dependencies order an update after the reads of its variable, not
    after everything that consumes what was read. Where a gradient still needs a read value
    of a table (`sparse_dense_matmul`'s gradient for its values gathers rows of the read
    table, for `bias_x`) and the executor happens to run that gather after the table's
    update, the update finds the buffer shared and copies the whole table first. Which
    order the executor picks was fixed per process: on this machine 1 process in 4 of the
    gate's sdm cell copied its 4 MB table in every step (`__memcpy` under
    `PrepareToUpdateVariable`), which made the cell bimodal across processes and failed
    CI's counted tier by 9%. With the table's update after every gradient, the read is
    released before it starts. Only such tables wait: making every update wait for every
    gradient cost 2.5-5% in estimated cycles (cache misses) in 9 of the gate's 12 cells."""
    tensors = []
    for grad in grads:
        if isinstance(grad, tf.IndexedSlices):
            tensors += [grad.values, grad.indices]
        elif grad is not None:
            tensors.append(grad)
    return tensors


class Trainer:
    """Owns a model, its optimizer and the traced train / predict / gradient-stats steps.

    `grad_types` maps each sparse table's name to the Python type of its gradient
    (`IndexedSlices` or `Tensor`, i.e. dense, or `fused` where none is built), recorded
    when the step is traced. `update_path` says how the table is updated: `optimizer`
    (from its gradient) or `fused` (the custom op's fused SGD / Lazy Adam, straight from
    the layer's output gradient).
    """

    def __init__(self, model: SparseModel, optimizer: Optimizer | None = None, device: str | None = "/CPU:0",
                 fused_updates: bool = True):
        """`fused_updates=False` sends the fused kernel's gradient through the optimizer
        even where a fused update exists (tests compare the two paths)."""
        self.model = model
        self.device = device
        spec = model.spec
        self.optimizer = optimizer or build_optimizer(spec.optimizer, spec.effective_learning_rate)
        self.optimizer.build(model.train_variables)
        self.grad_types: dict[str, str] = {}
        fused = fused_updates and model.kernel.fuses_normalization and self.optimizer.fused
        self.update_path = "fused" if fused else "optimizer"
        signature = batch_signature(model.num_features)
        step = self._fused_train_step if self.update_path == "fused" else self._train_step
        self.train_step = tf.function(step, input_signature=signature)
        self.gradient_stats = tf.function(self._gradient_stats, input_signature=signature)
        self.predict_logits = tf.function(lambda sp: model(sp, training=False), input_signature=signature[:1])

    def _placement(self):
        """Ops on the trainer's device; none given (a parameter-server strategy's scope),
        TensorFlow's placement: variables on the PS tasks, compute on the worker."""
        return tf.device(self.device) if self.device is not None else contextlib.nullcontext()

    def _gradients(self, sp, labels):
        # Name scopes let the profiler split a step into phases: ops under forward/...,
        # their gradients under gradient_tape/forward/..., and the update under optimizer/...
        with self._placement(), tf.GradientTape() as tape, tf.name_scope("forward"):
            loss = loss_fn(self.model(sp, training=True), labels)
        variables = self.model.train_variables
        return loss, tape.gradient(loss, variables), variables

    def _train_step(self, sp, labels):
        loss, grads, variables = self._gradients(sp, labels)
        for grad, var in zip(grads, variables):
            if self.model.is_sparse_table(var):
                self.grad_types[var.name] = "IndexedSlices" if isinstance(grad, tf.IndexedSlices) else "dense"
        wait = gradient_tensors(grads) if self.model.kernel.reads_whole_table else []
        with self._placement(), tf.name_scope("optimizer"):
            self.optimizer.apply(zip(grads, variables), wait_for={table.ref(): wait for table in self.model.kernel.tables})
        return loss

    def _fused_train_step(self, sp, labels):
        """The table and bias_x are updated by the fused op from the gradient of the
        layer's output; only the dense variables go through the optimizer."""
        model = self.model
        with self._placement(), tf.GradientTape() as tape, tf.name_scope("forward"):
            pre, normalized, rows, keys = model.fused_pre_activation(sp, training=True, watch=False)
            tape.watch(pre)  # the layer's output is where backprop stops: the fused update takes it from here
            loss = loss_fn(model.head(model.activation(pre + model.sparse_bias)), labels)
        dense = model.dense_variables
        grad_out, *grads = tape.gradient(loss, [pre, *dense])
        for table in model.kernel.tables:
            self.grad_types[table.name] = "fused"
        bias_x = model.norm.bias_x if model.norm is not None else None
        with self._placement(), tf.name_scope("optimizer"):
            self.optimizer.apply_fused(model.kernel.tables[0], bias_x, rows, keys, normalized, grad_out)
            self.optimizer.apply(zip(grads, dense))
        return loss

    def _gradient_stats(self, sp, labels):
        """Logical rows of the sparse table a step's update writes, as the optimizer applies
        it (all of them for a dense gradient or a dense optimizer such as `adam`).

        Kept out of the train step so the Unique op it needs is not timed. Note: it also
        advances the normalization maxima like a train step would.
        """
        _, grads, variables = self._gradients(sp, labels)
        touched = []
        for grad, var in zip(grads, variables):
            if self.model.is_sparse_table(var):
                touched.append(self.optimizer.rows_touched(grad, var))
        # Column shards each hold a slice of the same logical rows: count those once.
        return touched[0] if self.model.kernel.shards_share_rows else tf.add_n(touched)


def build_trainer(spec: ModelSpec, num_features: int, device: str | None, calibration: Calibration | None = None,
                  fused_updates: bool = True) -> Trainer:
    """Model, optimizer and slots created on `device` (`/CPU:0` or `/GPU:0`; None: where
    the distribution strategy in scope puts them)."""
    with tf.device(device) if device is not None else contextlib.nullcontext():
        return Trainer(SparseModel(spec, num_features, calibration), device=device, fused_updates=fused_updates)
