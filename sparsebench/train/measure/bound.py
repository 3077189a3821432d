"""A cell's memory bound: the samples/s at which its layer's memory traffic alone would run.

Why: "3.3x faster than the stock op" says nothing about how far a variant is from what
this machine can do. A roofline for embedding layers needs the traffic the layer cannot
avoid, replayed on the cell's own key stream, because the stream decides the speed:
with Zipf keys most entries hit a few thousand hot rows that stay in cache, and a batch
repeats keys, so random gathers of the same count overstate the cost several-fold.

What is replayed (`SparsebenchMemoryBound`, in the fused op's library, on the worker's
intra-op pool, i.e. with the cell's threads): the cell's own batches (its batch pool), on
tables of the cell's shape allocated for the purpose, per batch
- the forward pass: each entry's row read into its example's output row (and, with the
  normalization, the key's maximum and bias read), split by example over the threads;
- the update: each distinct key's row read and written once in every table the optimizer
  keeps per row (`ROW_TABLES`: SGD 1; Lazy Adam 3, the weights and both moments; Adagrad 2;
  FTRL 3), and with the normalization its bias (and the bias's moments), split by key;
  dense Adam decays every row of its three tables every step, so its update is every row.
Nothing else: no gradient arithmetic, no hashing, no dense head, no input. A step can
therefore not beat the bound, and `report` shows each cell as a share of it.

What it is not: Hogwild workers are not replayed (one stream, the cell's intra-op
threads); discretized keys are replayed as read (before the discretizer renames them);
parameter-server cells move their rows over the network, which this does not model.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

ROW_TABLES = {"sgd": 1, "lazy_adam": 3, "adagrad": 2, "ftrl": 3, "adam": 3}
DENSE_UPDATE = frozenset({"adam"})
WINDOWS = 5  # the bound's windows, each of as many passes as fill a fifth of its time
MIN_WINDOWS = 3  # where one pass outlasts that (a dense update of a large table): fewer, of one pass each
MAX_SECONDS = 3.0
MIN_SECONDS = 0.2


@dataclass
class KeyStream:
    """A cell's batches as the replay takes them: entries (rows, keys) concatenated, with
    the offsets of each batch, and each batch's distinct keys in first-seen order."""

    rows: np.ndarray
    keys: np.ndarray
    splits: np.ndarray
    unique: np.ndarray
    unique_splits: np.ndarray
    samples: int

    @classmethod
    def of(cls, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> "KeyStream":
        """From (rows, keys) pairs, one per batch (rows ascending from 0)."""
        rows, keys, unique, samples = [], [], [], 0
        for batch_rows, batch_keys in batches:
            rows.append(np.asarray(batch_rows, np.int64))
            keys.append(np.asarray(batch_keys, np.int64))
            _, first = np.unique(batch_keys, return_index=True)
            unique.append(np.asarray(batch_keys, np.int64)[np.sort(first)])
            samples += int(batch_rows[-1]) + 1 if len(batch_rows) else 0
        if not rows:
            raise ValueError("no batch to replay")
        splits = np.concatenate([[0], np.cumsum([len(k) for k in keys])]).astype(np.int64)
        unique_splits = np.concatenate([[0], np.cumsum([len(u) for u in unique])]).astype(np.int64)
        return cls(np.concatenate(rows), np.concatenate(keys), splits, np.concatenate(unique), unique_splits, samples)

    def traffic_bytes(self, num_keys: int, cols: int, optimizer: str, normalize: bool) -> int:
        """Bytes one pass must move at the least: rows read by the forward pass, rows read
        and written by the update (and the per-key scalars)."""
        tables = ROW_TABLES[optimizer]
        row = cols * 4
        forward = len(self.keys) * (row + (8 if normalize else 0))
        batches = len(self.splits) - 1
        updated_rows = num_keys * batches if optimizer in DENSE_UPDATE else len(self.unique)
        update = updated_rows * 2 * (tables * row + (tables * 4 if normalize else 0))
        return int(forward + update)


def bound_seconds(measure) -> float:
    """How long the bound is measured: a quarter of the timed windows, 0.2 to 3 s."""
    steps, seconds = measure.window_limits()
    per_window = seconds if seconds is not None else 1.0
    return min(MAX_SECONDS, max(MIN_SECONDS, measure.windows * per_window / 4))


def memory_bound(stream: KeyStream, *, library: Any, num_keys: int, cols: int, optimizer: str, normalize: bool,
                 seconds: float) -> dict[str, Any]:
    """Replay `stream` with the op library's `SparsebenchMemoryBound` (`library`, the
    loaded fused op library) for about `seconds`, in WINDOWS windows of whole passes after
    one pass that sizes them; the record's bound_* fields (the bound is the median window)."""
    import tensorflow as tf

    if optimizer not in ROW_TABLES:
        raise ValueError(f"no memory bound for optimizer {optimizer!r}")
    args = dict(rows=tf.constant(stream.rows), keys=tf.constant(stream.keys), batch_splits=tf.constant(stream.splits),
                unique_keys=tf.constant(stream.unique), unique_splits=tf.constant(stream.unique_splits),
                num_keys=tf.constant(num_keys, tf.int64), cols=tf.constant(cols, tf.int64),
                row_tables=tf.constant(ROW_TABLES[optimizer], tf.int64),
                dense_update=tf.constant(optimizer in DENSE_UPDATE), normalize=tf.constant(bool(normalize)))
    with tf.device("/CPU:0"):
        replay = lambda passes: library.sparsebench_memory_bound(  # noqa: E731
            **args, passes=tf.constant(passes, tf.int64)).numpy()
        first = float(replay(1)[0])  # sizes the windows (each call fills its tables before timing)
        per_window = max(1, int(seconds / WINDOWS / max(first, 1e-6)))
        count = WINDOWS if per_window > 1 else max(MIN_WINDOWS, min(WINDOWS, int(seconds / max(first, 1e-6))))
        windows = [float(replay(per_window).sum()) for _ in range(count)]
    rates = [stream.samples * per_window / s for s in windows if s > 0]
    traffic = stream.traffic_bytes(num_keys, cols, optimizer, normalize)
    median = statistics.median(rates)
    return {"bound_samples_per_sec": float(median), "bound_windows": [float(r) for r in rates],
            "bound_bytes_per_sample": float(traffic / stream.samples),
            "bound_gb_per_sec": float(traffic / stream.samples * median / 1e9)}
