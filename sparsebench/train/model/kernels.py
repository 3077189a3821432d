"""The ways of computing `sp @ W` that sparsebench compares, behind one interface.

Every kernel owns the sparse weight table W (`[num_features, out_dim]`, zero-initialized
as in twml), possibly split into shards, and maps a batch `tf.SparseTensor` (indices
`[row, key]`, values = normalized feature values, dense_shape `[B, num_features]`) to a
dense `[B, out_dim]` tensor. All kernels compute the same function; they differ in the
ops they run and in the gradient type they give W:

- `sparse_dense_matmul`: `tf.sparse.sparse_dense_matmul`; dense gradient (the baseline).
- `embedding_lookup_sparse`: `tf.nn.embedding_lookup_sparse(combiner="sum")`; IndexedSlices.
- `embedding_lookup_sparse_fast`: the ops of TF's `allow_fast_lookup=True` path (no `Unique`),
  written out because TF never takes that path for a variable inside `tf.function`.
- `ragged_embedding_lookup`: ragged ids -> `tf.nn.embedding_lookup` -> weighted row sums.
- `row_partitioned`: W split along rows into `shards` variables by the `mod` or `div`
  strategy; each shard gathers the ids that fall in it and the partial outputs are summed.
- `col_partitioned`: W split along columns; each shard runs the lookup for all ids on its
  slice of the outputs and the slices are concatenated.
- `fused_custom_op`: sparsebench's own C++ ops, normalization included (`FusedCustomOp`).

`assemble` maps per-shard tensors (weights or gradients) back to the full `[N, out_dim]`
layout, so tests can check every variant against one dense reference.
"""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

from ...errors import ConfigError


def _lookup_ids(sp: tf.SparseTensor) -> tf.SparseTensor:
    """The ids SparseTensor embedding_lookup_sparse wants: values are the keys."""
    return tf.SparseTensor(sp.indices, sp.indices[:, 1], sp.dense_shape)


def _pad_rows(out: tf.Tensor, batch_size: tf.Tensor) -> tf.Tensor:
    """embedding_lookup_sparse drops trailing empty rows; give them back as zeros."""
    missing = tf.cast(batch_size, tf.int32) - tf.shape(out)[0]
    return tf.pad(out, [[0, missing], [0, 0]])


def _split_sizes(total: int, parts: int) -> list[int]:
    """`total` split into `parts` near-equal sizes, larger ones first (TF's div layout)."""
    base, extra = divmod(total, parts)
    return [base + 1 if p < extra else base for p in range(parts)]


class SparseKernel(tf.Module):
    """Base class: owns the table shards and computes `sp @ W`."""

    variant = ""
    shards_share_rows = False  # True where every shard holds a slice of every row
    fuses_normalization = False  # True: `fused()` applies the max-normalization itself
    # True where the forward reads the whole table (one tensor sharing its buffer) and the
    # gradient still consumes that read: the table's update must wait for it (trainer.py).
    reads_whole_table = False

    def __init__(self, num_features: int, out_dim: int, shards: int = 1, name: str | None = None):
        super().__init__(name=name or self.variant)
        if shards < 1:
            raise ConfigError(f"shards: must be >= 1, got {shards}")
        self.num_features = num_features
        self.out_dim = out_dim
        self.shards = shards
        self.tables = [
            tf.Variable(tf.zeros(shape, tf.float32), name=f"W_{p}") for p, shape in enumerate(self.shard_shapes())
        ]

    def shard_shapes(self) -> list[tuple[int, int]]:
        return [(self.num_features, self.out_dim)]

    def __call__(self, sp: tf.SparseTensor) -> tf.Tensor:
        raise NotImplementedError

    def assemble(self, per_shard: list[tf.Tensor]) -> tf.Tensor:
        """Per-shard `[rows_p, cols_p]` tensors -> one `[num_features, out_dim]` tensor."""
        return tf.convert_to_tensor(per_shard[0])

    def split(self, full: tf.Tensor) -> list[tf.Tensor]:
        """The inverse of `assemble`: a full matrix cut into this kernel's shards."""
        return [full]

    def assign_full(self, full) -> None:
        for table, part in zip(self.tables, self.split(tf.convert_to_tensor(full, tf.float32))):
            table.assign(part)


class SparseDenseMatmul(SparseKernel):
    variant = "sparse_dense_matmul"
    reads_whole_table = True  # its gradient for the values (bias_x's path) gathers rows of the read table

    def __call__(self, sp):
        return tf.sparse.sparse_dense_matmul(sp, self.tables[0])


class EmbeddingLookupSparse(SparseKernel):
    """`tf.nn.embedding_lookup_sparse` as TensorFlow runs it for a variable: `Unique` on
    the ids, a gather of the unique rows, a gather back to every entry, weights, `SegmentSum`."""

    variant = "embedding_lookup_sparse"

    def __call__(self, sp):
        out = tf.nn.embedding_lookup_sparse(self.tables[0], _lookup_ids(sp), sp, combiner="sum")
        return _pad_rows(out, sp.dense_shape[0])


class EmbeddingLookupSparseFast(SparseKernel):
    """The computation of `embedding_lookup_sparse(..., allow_fast_lookup=True)`, built
    from its ops: gather every entry's row straight from the table (no `Unique`, so a key
    repeated in a batch is read once per entry), scale by the value, `SegmentSum` by
    example (rows arrive sorted: the batch is in canonical order).

    Why written out: TensorFlow takes that fast path only when the table is a plain tensor
    on the same device string as the ids. A `tf.Variable` is a CompositeTensor, which the
    check excludes, and inside `tf.function` the device strings differ, so passing
    `allow_fast_lookup=True` builds exactly the graph of the plain lookup (tests compare
    the traced graphs). The gradient for W is `IndexedSlices` with one slice per entry.
    """

    variant = "embedding_lookup_sparse_fast"

    def __call__(self, sp):
        gathered = tf.gather(self.tables[0], sp.indices[:, 1]) * tf.expand_dims(sp.values, 1)
        return _pad_rows(tf.math.segment_sum(gathered, sp.indices[:, 0]), sp.dense_shape[0])


class RaggedEmbeddingLookup(SparseKernel):
    """The RaggedTensor route: ids and weights as ragged rows, `tf.nn.embedding_lookup`
    on the ragged ids, weighted and summed per row. Correct, and measured slower than
    `embedding_lookup_sparse` on CPU (kept so suites can show it)."""

    variant = "ragged_embedding_lookup"

    def __call__(self, sp):
        rows, nrows = sp.indices[:, 0], sp.dense_shape[0]
        ids = tf.RaggedTensor.from_value_rowids(sp.indices[:, 1], rows, nrows=nrows)
        weights = tf.RaggedTensor.from_value_rowids(sp.values, rows, nrows=nrows)
        gathered = tf.nn.embedding_lookup(self.tables[0], ids)
        return tf.reduce_sum(gathered * tf.expand_dims(weights, -1), axis=1)


class RowPartitioned(SparseKernel):
    """W split by rows; `mod`: key k lives in shard k % P, `div`: in contiguous blocks."""

    variant = "row_partitioned"

    def __init__(self, num_features, out_dim, shards=1, strategy="mod", name=None):
        if strategy not in ("mod", "div"):
            raise ConfigError(f"partition_strategy: must be 'mod' or 'div', got {strategy!r}")
        self.strategy = strategy
        self._row_counts = (
            [len(range(p, num_features, shards)) for p in range(shards)]
            if strategy == "mod"
            else _split_sizes(num_features, shards)
        )
        super().__init__(num_features, out_dim, shards, name)

    def shard_shapes(self):
        return [(rows, self.out_dim) for rows in self._row_counts]

    def shard_of(self, keys: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(shard index, row inside the shard) for each key."""
        p = self.shards
        if self.strategy == "mod":
            return keys % p, keys // p
        base, extra = divmod(self.num_features, p)
        boundary = extra * (base + 1)  # keys below it live in the larger shards
        in_large = keys < boundary
        shard = tf.where(in_large, keys // (base + 1), extra + (keys - boundary) // max(base, 1))
        local = tf.where(in_large, keys % (base + 1), (keys - boundary) % max(base, 1))
        return shard, local

    def __call__(self, sp):
        rows, keys = sp.indices[:, 0], sp.indices[:, 1]
        batch_size = sp.dense_shape[0]
        if self.shards == 1:
            return self._partial(self.tables[0], rows, keys, sp.values, batch_size)
        shard, local = self.shard_of(keys)
        shard = tf.cast(shard, tf.int32)
        parts = zip(
            self.tables,
            tf.dynamic_partition(rows, shard, self.shards),
            tf.dynamic_partition(local, shard, self.shards),
            tf.dynamic_partition(sp.values, shard, self.shards),
        )
        return tf.add_n([self._partial(table, r, k, v, batch_size) for table, r, k, v in parts])

    @staticmethod
    def _partial(table, rows, local_keys, values, batch_size):
        gathered = tf.gather(table, local_keys) * tf.expand_dims(values, 1)
        return tf.math.unsorted_segment_sum(gathered, rows, batch_size)

    def _global_keys(self, p: int) -> tf.Tensor:
        if self.strategy == "mod":
            return tf.range(p, self.num_features, self.shards, dtype=tf.int64)
        start = sum(self._row_counts[:p])
        return tf.range(start, start + self._row_counts[p], dtype=tf.int64)

    def assemble(self, per_shard):
        full = tf.zeros([self.num_features, self.out_dim], tf.float32)
        for p, part in enumerate(per_shard):
            full = tf.tensor_scatter_nd_update(
                full, tf.expand_dims(self._global_keys(p), 1), tf.convert_to_tensor(part)
            )
        return full

    def split(self, full):
        return [tf.gather(full, self._global_keys(p)) for p in range(self.shards)]


class ColPartitioned(SparseKernel):
    """W split by output columns; every shard sees every id, outputs are concatenated."""

    variant = "col_partitioned"
    shards_share_rows = True

    def __init__(self, num_features, out_dim, shards=1, name=None):
        if shards > out_dim:
            raise ConfigError(f"shards: col_partitioned needs shards <= out_dim ({out_dim}), got {shards}")
        self._col_counts = _split_sizes(out_dim, shards)
        super().__init__(num_features, out_dim, shards, name)

    def shard_shapes(self):
        return [(self.num_features, cols) for cols in self._col_counts]

    def __call__(self, sp):
        ids = _lookup_ids(sp)
        outs = [
            _pad_rows(tf.nn.embedding_lookup_sparse(table, ids, sp, combiner="sum"), sp.dense_shape[0])
            for table in self.tables
        ]
        return outs[0] if len(outs) == 1 else tf.concat(outs, axis=1)

    def assemble(self, per_shard):
        return tf.concat([tf.convert_to_tensor(part) for part in per_shard], axis=1)

    def split(self, full):
        return tf.split(full, self._col_counts, axis=1)


class FusedCustomOp(SparseKernel):
    """The sparse layer as C++ ops (`custom_ops/fused_layer.cc`): one pass over the batch's
    entries computes `sp @ W`, and inside the complete model also the max-normalization
    and per-feature bias (`fused`), so no gather, segment sum or `[nnz, out_dim]`
    temporary is built in the forward pass. Its registered gradient gives `IndexedSlices`;
    with SGD and Lazy Adam the trainer skips it and updates W and bias_x straight from the
    output gradient. CPU only."""

    variant = "fused_custom_op"
    fuses_normalization = True

    def __call__(self, sp):
        from ..custom_ops.ops import fused_layer

        out, _ = fused_layer(self.tables[0], sp.indices[:, 0], sp.indices[:, 1], sp.values, sp.dense_shape[0])
        return out

    def fused(self, rows, keys, values, batch_size, bias_x, max_x, training: bool, watch: bool = True):
        """(output [B, out_dim], each entry's normalized value) with the normalization inside;
        `watch=False` builds no gradient for the table and bias_x (the fused updates)."""
        from ..custom_ops.ops import fused_layer

        return fused_layer(self.tables[0], rows, keys, values, batch_size, bias_x, max_x, training, watch)


KernelFactory = Callable[..., SparseKernel]

REGISTRY: dict[str, KernelFactory] = {
    SparseDenseMatmul.variant: lambda n, d, shards=1, strategy="mod": SparseDenseMatmul(n, d, 1),
    EmbeddingLookupSparse.variant: lambda n, d, shards=1, strategy="mod": EmbeddingLookupSparse(n, d, 1),
    EmbeddingLookupSparseFast.variant: lambda n, d, shards=1, strategy="mod": EmbeddingLookupSparseFast(n, d, 1),
    RaggedEmbeddingLookup.variant: lambda n, d, shards=1, strategy="mod": RaggedEmbeddingLookup(n, d, 1),
    RowPartitioned.variant: lambda n, d, shards=1, strategy="mod": RowPartitioned(n, d, shards, strategy),
    ColPartitioned.variant: lambda n, d, shards=1, strategy="mod": ColPartitioned(n, d, shards),
    FusedCustomOp.variant: lambda n, d, shards=1, strategy="mod": FusedCustomOp(n, d, 1),
}


def build_kernel(variant: str, num_features: int, out_dim: int, shards: int = 1, strategy: str = "mod") -> SparseKernel:
    """The kernel for `variant`; only the partitioned variants accept `shards` > 1."""
    if variant not in REGISTRY:
        raise ConfigError(f"variant: unknown variant {variant!r}; known: {', '.join(REGISTRY)}")
    if shards != 1 and variant not in (RowPartitioned.variant, ColPartitioned.variant):
        raise ConfigError(f"shards: variant {variant!r} is not partitioned; shards must be 1, got {shards}")
    return REGISTRY[variant](num_features, out_dim, shards=shards, strategy=strategy)
