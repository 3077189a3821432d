"""Python faces of the fused ops, and the gradient TensorFlow uses for the forward op.

The forward op takes the variables' resource handles (so nothing reads or copies the
whole table) and returns the layer's output and each entry's normalized value. Its
registered gradient returns `IndexedSlices` for the table and `bias_x` (one slice per
entry), so every optimizer of `sparsebench.train.model.optimizers` works unchanged; the fused
updates skip that gradient and apply SGD or Lazy Adam straight from the output gradient.
"""

from __future__ import annotations

import tensorflow as tf
from tensorflow.python.ops.resource_variable_ops import variable_accessed

from .build import load

NORM_EPSILON = 1e-5


@tf.autograph.experimental.do_not_convert  # loading is Python work, not graph code
def _ops():
    return load()


def _accessed(*variables, watch: bool = True) -> None:
    """Tell a traced function, and the gradient tape unless `watch` is false, that these
    variables are used: the ops take their handles, which TensorFlow does not see as a read."""
    for variable in variables:
        if variable is None:
            continue
        if watch:
            variable_accessed(variable)
        elif hasattr(tf.compat.v1.get_default_graph(), "watch_variable"):
            tf.compat.v1.get_default_graph().watch_variable(variable)


def fused_layer(table: tf.Variable, rows, keys, values, batch_size, bias_x: tf.Variable | None = None,
                max_x: tf.Variable | None = None, training: bool = True, watch: bool = True):
    """(out [B, out_dim], normalized [nnz]); without bias_x/max_x: no normalization.

    `watch=False`: the tape is not told about the table and bias_x, so no gradient is built
    for them (the fused updates need only the gradient of `out`)."""
    normalize = bias_x is not None and max_x is not None
    _accessed(table, bias_x, max_x, watch=watch)
    out, normalized = _ops().sparsebench_fused_layer(
        table=table.handle,
        bias_x=(bias_x if normalize else table).handle,
        max_x=(max_x if normalize else table).handle,
        rows=rows, keys=keys, values=values, batch_size=tf.cast(batch_size, tf.int64),
        normalize=normalize, training=training, epsilon=NORM_EPSILON)
    out.set_shape([None, table.shape[1]])
    return out, normalized


@tf.RegisterGradient("SparsebenchFusedLayer")
def _fused_layer_grad(op, grad_out, grad_normalized):
    """IndexedSlices for the table and bias_x; nothing for max_x (not trainable), the
    batch or, when normalizing, the values (no gradient flows through the scale). Without
    normalization the op is a plain sp @ W and the values get their gradient."""
    table, bias_x = op.inputs[0], op.inputs[1]
    rows, keys = op.inputs[3], op.inputs[4]
    normalized = op.outputs[1]
    table_grad, bias_grad = _ops().sparsebench_fused_layer_grad(
        table=table, rows=rows, keys=keys, normalized=normalized, grad_out=grad_out)
    table_slices = tf.IndexedSlices(table_grad, keys, tf.raw_ops.VariableShape(input=table, out_type=tf.int64))
    if not op.get_attr("normalize"):  # a plain sp @ W: the values' gradient is the same per-entry dot product
        return [table_slices, None, None, None, None, bias_grad, None]
    bias_shape = tf.raw_ops.VariableShape(input=bias_x, out_type=tf.int64)
    return [table_slices, tf.IndexedSlices(bias_grad, keys, bias_shape), None, None, None, None, None]


def fused_sgd(table: tf.Variable, bias_x: tf.Variable | None, rows, keys, normalized, grad_out, learning_rate):
    _accessed(table, bias_x, watch=False)
    return _ops().sparsebench_fused_sgd_update(
        table=table.handle, bias_x=(bias_x if bias_x is not None else table).handle, rows=rows, keys=keys,
        normalized=normalized, grad_out=grad_out, learning_rate=tf.cast(learning_rate, tf.float32),
        normalize=bias_x is not None)


def fused_lazy_adam(table, table_m, table_v, bias_x, bias_m, bias_v, rows, keys, normalized, grad_out, learning_rate,
                    beta1, beta2, epsilon, beta1_power, beta2_power):
    normalize = bias_x is not None
    _accessed(table, table_m, table_v, bias_x, bias_m, bias_v, watch=False)
    return _ops().sparsebench_fused_lazy_adam_update(
        table=table.handle, table_m=table_m.handle, table_v=table_v.handle,
        bias_x=(bias_x if normalize else table).handle, bias_m=(bias_m if normalize else table_m).handle,
        bias_v=(bias_v if normalize else table_v).handle, rows=rows, keys=keys, normalized=normalized,
        grad_out=grad_out, learning_rate=tf.cast(learning_rate, tf.float32), beta1=tf.cast(beta1, tf.float32),
        beta2=tf.cast(beta2, tf.float32), epsilon=tf.cast(epsilon, tf.float32),
        beta1_power=tf.cast(beta1_power, tf.float32), beta2_power=tf.cast(beta2_power, tf.float32),
        normalize=normalize)


def parse_text(lines, text_format: str, feature_bits: int):
    """A vector of libsvm or Criteo lines -> (row_lengths int32, labels, keys int64, values,
    line_kinds int32: 0 example, 1 skipped, 2 bad), by `parse_text.cc` (the rules of
    `train/inputs/datafiles.py`). Loads the library when first called: where it cannot be
    built, `CustomOpUnavailable` (the cell is skipped with the reason)."""
    return _ops().sparsebench_parse_text(lines=lines, format=text_format, feature_bits=feature_bits)


def text_parser():
    """The op library loaded now (so a cell that cannot have it is skipped before it opens
    its input), and `parse_text` for the pipeline."""
    _ops()
    return parse_text
