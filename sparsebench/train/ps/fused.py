"""The fused layer on parameter servers: the rows stay where they live.

The stock layouts ship rows: every entry's row of the table travels from its PS task to
the worker, and every gradient row travels back. Here each PS task holds a row shard of
the table (`mod`: PS `i` holds the rows whose key `k % P == i`, as row `k // P`), with its
rows' maxima and per-feature bias beside them. A step on a worker:

1. splits the batch's entries by shard (`dynamic_partition`, order kept) and sends each PS
   task only its entries: shard-local keys as int32, values as float32, and how many of
   them each batch row has (int32 [batch]: the entries are in row order);
2. each PS task runs the fused forward on its entries (`fused_layer`, normalization and
   bias inside, its maxima updated in place) and returns its partial `[batch, out_dim]` sum;
3. the worker sums the partials, runs the dense head and its gradient, and sends the
   output gradient `[batch, out_dim]` to every PS task;
4. each PS task applies the fused update (SGD or Lazy Adam) to its shard from the output
   gradient and the entries it kept, so the normalized values never travel.

Per PS task and step that is 8 bytes per entry of its shard, 4 per batch row, and two
`[batch, out_dim]` float tensors, where `row_partitioned` moves `4 * out_dim` bytes per
entry each way. The
function is the local fused step's: one synchronous step leaves every variable within
float rounding of the local one (tests/test_distributed.py).

Every task must have the op library loaded before its server starts (`cluster_task
--custom-op`): the worker builds the function's graph, and the PS tasks run the ops.
"""

from __future__ import annotations

import tensorflow as tf

from ...errors import CellSkipped
from ...plan.spec import ModelSpec
from ..model.optimizers import build_optimizer
from ..model.trainer import _ACTIVATIONS, Calibration, DenseHead, Discretizer, batch_signature, loss_fn

FUSED_PS_OPTIMIZERS = ("sgd", "lazy_adam")


def shard_rows(num_features: int, shards: int, shard: int) -> int:
    """Rows of `shard` under mod sharding: the keys k < num_features with k % shards == shard."""
    return len(range(shard, num_features, shards))


def _beside(variable: tf.Variable):
    """Create variables on `variable`'s task: a parameter-server strategy ignores `tf.device`
    for variables (round-robin) but honours colocation."""
    if tf.distribute.has_strategy():
        return tf.distribute.get_strategy().extended.colocate_vars_with(variable)
    return tf.device(variable.device)


class ShardedFusedModel(tf.Module):
    """The complete model with the fused layer's table, maxima and per-feature bias split
    into row shards, one per PS task; the rest (the layer's bias, the dense head) where the
    strategy places it."""

    def __init__(self, spec: ModelSpec, num_features: int, shards: int, calibration: Calibration | None = None):
        """Under a parameter-server strategy (its scope entered by the caller), the `shards`
        tables are created one after the other, so round-robin placement puts each on a PS
        task of its own (`shards` = the PS tasks); each shard's maxima and bias are
        colocated with its table, and its ops run on the table's device."""
        super().__init__(name="sparse_model")
        spec.validate()
        self.spec, self.num_features = spec, num_features
        self.discretizer = Discretizer(calibration, num_features) if spec.discretizer else None
        self.tables = [tf.Variable(tf.zeros([shard_rows(num_features, shards, i), spec.out_dim]), name=f"W_shard{i}")
                       for i in range(shards)]
        self.devices = [table.device for table in self.tables]
        if len(set(self.devices)) != shards:
            raise CellSkipped("shards not on distinct PS tasks",
                              f"the fused layer's {shards} table shards landed on {sorted(set(self.devices))}")
        self.maxima: list[tf.Variable] = []
        self.feature_bias: list[tf.Variable] = []
        for i, table in enumerate(self.tables) if spec.normalization else ():
            with _beside(table):
                self.maxima.append(tf.Variable(tf.zeros(table.shape[:1]), trainable=False, name=f"max_x_shard{i}"))
                self.feature_bias.append(tf.Variable(tf.zeros(table.shape[:1]), name=f"bias_x_shard{i}"))
        self.norm = None  # the maxima live in the shards (`maxima`)
        self.sparse_bias = tf.Variable(tf.fill([spec.out_dim], 1.0 / spec.out_dim), name="sparse_bias")
        self.activation = _ACTIVATIONS[spec.activation]
        self.head = DenseHead(spec.out_dim, spec.hidden_units, spec.seed)

    @property
    def shards(self) -> int:
        return len(self.devices)

    @property
    def dense_variables(self) -> list[tf.Variable]:
        """The variables outside the shards: the layer's bias and the dense head."""
        return [self.sparse_bias, *self.head.parameters]

    @property
    def train_variables(self) -> list[tf.Variable]:
        return [*self.tables, *self.feature_bias, *self.dense_variables]

    def shard_entries(self, sp: tf.SparseTensor) -> list[tuple[tf.Tensor, tf.Tensor, tf.Tensor]]:
        """Per shard, on the worker: (entries per batch row int32 [B], shard-local keys
        int32, values) of the entries whose key falls in it, in the batch's order. A
        SparseTensor's entries are in row order, and `dynamic_partition` keeps it, so the PS
        task rebuilds each entry's row from the per-row counts: 4 bytes per row instead of
        per entry. int32 keys halve what the keys take; a shard-local key fits."""
        rows, keys, values = sp.indices[:, 0], sp.indices[:, 1], sp.values
        if self.discretizer is not None:
            keys, values = self.discretizer(keys, values)
        shards = tf.constant(self.shards, tf.int64)
        which = tf.cast(keys % shards, tf.int32)
        batch_size = tf.cast(sp.dense_shape[0], tf.int32)
        counts = [tf.math.bincount(part, minlength=batch_size, maxlength=batch_size, dtype=tf.int32)
                  for part in tf.dynamic_partition(tf.cast(rows, tf.int32), which, self.shards)]
        parts = zip(counts, tf.dynamic_partition(tf.cast(keys // shards, tf.int32), which, self.shards),
                    tf.dynamic_partition(values, which, self.shards))
        return list(parts)

    def partials(self, sp: tf.SparseTensor, training: bool):
        """(sum of the shards' partial outputs [B, out_dim], per shard the entries it kept
        as (rows, keys, normalized), all on its PS task)."""
        from ..custom_ops.ops import fused_layer

        outputs, kept = [], []
        for i, (counts, keys, values) in enumerate(self.shard_entries(sp)):
            with tf.device(self.devices[i]):
                rows64 = tf.repeat(tf.range(tf.size(counts, out_type=tf.int64)), tf.cast(counts, tf.int64))
                keys64 = tf.cast(keys, tf.int64)
                bias_x = self.feature_bias[i] if self.feature_bias else None
                max_x = self.maxima[i] if self.maxima else None
                out, normalized = fused_layer(self.tables[i], rows64, keys64, values, sp.dense_shape[0], bias_x, max_x,
                                              training, watch=False)
            outputs.append(out)
            kept.append((rows64, keys64, normalized))
        return tf.add_n(outputs), kept

    def __call__(self, sp: tf.SparseTensor, training: bool = False) -> tf.Tensor:
        pre, _ = self.partials(sp, training)
        return self.head(self.activation(pre + self.sparse_bias))


class ShardedFusedTrainer:
    """The `Trainer` face `PsTraining` and the record need, for `ShardedFusedModel`: its
    train step applies the fused update on each shard's PS task from the output gradient."""

    update_path = "fused"

    def __init__(self, spec: ModelSpec, num_features: int, ps_tasks: int, calibration: Calibration | None = None):
        if spec.optimizer not in FUSED_PS_OPTIMIZERS:
            raise CellSkipped("no fused update for this optimizer on parameter servers",
                              f"the fused layer on PS tasks updates with {' or '.join(FUSED_PS_OPTIMIZERS)} "
                              f"(from the output gradient, where the rows live); {spec.optimizer} needs the rows' "
                              f"gradient on the worker")
        self.model = ShardedFusedModel(spec, num_features, ps_tasks, calibration)
        self.optimizer = build_optimizer(spec.optimizer, spec.effective_learning_rate)
        self.optimizer.build(self.model.train_variables)  # slots beside their variable, on its PS task
        self.grad_types = {table.name: "fused" for table in self.model.tables}
        signature = batch_signature(num_features)
        self.train_step = tf.function(self._train_step, input_signature=signature)
        self.predict_logits = tf.function(lambda sp: self.model(sp, training=False), input_signature=signature[:1])

    def _train_step(self, sp, labels):
        model = self.model
        with tf.name_scope("forward"):
            pre, kept = model.partials(sp, training=True)
        dense = model.dense_variables
        with tf.GradientTape() as tape, tf.name_scope("forward"):
            tape.watch(pre)  # backprop stops at the layer's output: each PS task updates its shard from it
            loss = loss_fn(model.head(model.activation(pre + model.sparse_bias)), labels)
        grad_out, *grads = tape.gradient(loss, [pre, *dense])
        with tf.name_scope("optimizer"):
            for i, (rows, keys, normalized) in enumerate(kept):
                with tf.device(model.devices[i]):
                    bias_x = model.feature_bias[i] if model.feature_bias else None
                    self.optimizer.apply_fused(model.tables[i], bias_x, rows, keys, normalized, grad_out)
            self.optimizer.apply(zip(grads, dense))
        return loss
