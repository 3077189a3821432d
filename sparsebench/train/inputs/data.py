"""Deterministic synthetic sparse data that looks like production ranking data.

Why synthetic: benchmarks must be repeatable anywhere without shipping data sets, yet a
uniform random matrix would hide exactly the effects the study is about (hot keys shared
by most examples, a long tail of rare keys, values spanning six orders of magnitude).

What it generates:
- key popularity follows a Zipf law over `2**feature_bits` hashed keys; ranks are mapped
  to keys by an odd multiplier so hot keys are spread over the table (and its shards);
- the number of active keys per example is log-normal (mean `mean_active`, tail
  `active_sigma`), capped at `max_active`; keys are unique within an example;
- each key is either binary (value 1) or continuous with its own scale `10**U(0, decades)`
  times a log-normal draw, so raw values up to ~1e6 and beyond occur;
- labels come from a hidden sparse logistic model over the same keys, so a model that
  learns shows an AUC above 0.5 on a held-out set.

Per-key properties come from a hash of the key, not from tables, so memory stays O(batch)
for any table size. This module imports TensorFlow only inside `to_sparse_tensor`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...plan.spec import DataSpec

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
# Odd multiplier: a bijection on [0, 2**bits) that scatters popularity ranks over the keys.
_RANK_TO_KEY_MULTIPLIER = 0x9E3779B1


@dataclass(frozen=True)
class SparseBatch:
    """A batch in CSR form, rows in order and keys sorted within each row.

    `coo_indices()` gives the canonical row-major `[nnz, 2]` indices a
    `tf.SparseTensor` wants.
    """

    row_splits: np.ndarray  # int64 [B + 1]
    keys: np.ndarray  # int64 [nnz]
    values: np.ndarray  # float32 [nnz]
    labels: np.ndarray  # float32 [B]

    @property
    def batch_size(self) -> int:
        return len(self.row_splits) - 1

    @property
    def nnz(self) -> int:
        return len(self.keys)

    def row_ids(self) -> np.ndarray:
        return np.repeat(np.arange(self.batch_size, dtype=np.int64), np.diff(self.row_splits))

    def coo_indices(self) -> np.ndarray:
        return np.stack([self.row_ids(), self.keys], axis=1)

    def slice(self, start: int, stop: int) -> "SparseBatch":
        lo, hi = self.row_splits[start], self.row_splits[stop]
        return SparseBatch(
            row_splits=self.row_splits[start : stop + 1] - lo,
            keys=self.keys[lo:hi],
            values=self.values[lo:hi],
            labels=self.labels[start:stop],
        )


def _splitmix64(x: np.ndarray) -> np.ndarray:
    z = (x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
    z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
    z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
    return z ^ (z >> np.uint64(31))


def _key_uniform(keys: np.ndarray, salt: int, seed: int) -> np.ndarray:
    """A uniform [0, 1) number per key, fixed by (key, salt, seed)."""
    mixed = _splitmix64(keys.astype(np.uint64) ^ _splitmix64(np.array([seed * 1000003 + salt], dtype=np.uint64)))
    return (mixed >> np.uint64(11)).astype(np.float64) / float(2**53)


class SyntheticData:
    """Generates batches and held-out sets from a `DataSpec`, deterministically."""

    _SALT_BINARY, _SALT_SCALE, _SALT_SIGNAL, _SALT_WEIGHT = 1, 2, 3, 4

    def __init__(self, spec: DataSpec):
        spec.validate()
        self.spec = spec
        self.num_features = spec.num_features
        # Fix the hidden logit's offset and spread once, from a calibration sample, so
        # every batch and the held-out set share one labelling function.
        raw = self._raw_logits(self._sample_features(4096, stream=10_000))
        self._logit_mean = float(raw.mean())
        self._logit_std = float(raw.std()) or 1.0

    # -- per-key properties -------------------------------------------------------
    def is_binary(self, keys: np.ndarray) -> np.ndarray:
        return _key_uniform(keys, self._SALT_BINARY, self.spec.seed) < self.spec.binary_fraction

    def value_scale(self, keys: np.ndarray) -> np.ndarray:
        return 10.0 ** (self.spec.value_decades * _key_uniform(keys, self._SALT_SCALE, self.spec.seed))

    def hidden_weight(self, keys: np.ndarray) -> np.ndarray:
        has_signal = _key_uniform(keys, self._SALT_SIGNAL, self.spec.seed) < self.spec.signal_fraction
        u = _key_uniform(keys, self._SALT_WEIGHT, self.spec.seed)
        magnitude = 0.5 + np.abs(2.0 * u - 1.0)
        sign = np.where(u < 0.5, -1.0, 1.0)
        return np.where(has_signal, sign * magnitude, 0.0)

    # -- sampling ------------------------------------------------------------------
    def _zipf_keys(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Keys whose popularity rank r (0 = hottest) has probability ~ 1/(r+1)**s."""
        u = rng.random(n)
        big_n = float(self.num_features)
        s = self.spec.zipf_exponent
        if abs(s - 1.0) < 1e-9:
            ranks = np.exp(u * np.log(big_n + 1.0)) - 1.0
        else:
            one_minus_s = 1.0 - s
            ranks = (u * ((big_n + 1.0) ** one_minus_s - 1.0) + 1.0) ** (1.0 / one_minus_s) - 1.0
        ranks = np.clip(np.floor(ranks), 0, big_n - 1).astype(np.uint64)
        return ((ranks * np.uint64(_RANK_TO_KEY_MULTIPLIER)) & np.uint64(self.num_features - 1)).astype(np.int64)

    def _sample_features(self, n: int, stream: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        spec = self.spec
        rng = np.random.default_rng([spec.seed, stream])
        mu = np.log(spec.mean_active) - spec.active_sigma**2 / 2.0
        counts = np.rint(rng.lognormal(mu, spec.active_sigma, size=n)).astype(np.int64)
        counts = np.clip(counts, 0, spec.max_active)
        # Hot keys repeat within an example; draw extra keys, drop repeats, then keep
        # `counts[row]` of the unique ones (chosen at random) so the mean holds.
        drawn = counts + (counts + 1) // 2 + 4
        rows = np.repeat(np.arange(n, dtype=np.int64), drawn)
        keys = self._zipf_keys(rng, len(rows))
        order = np.lexsort((keys, rows))
        rows, keys = rows[order], keys[order]
        unique = np.ones(len(keys), dtype=bool)
        unique[1:] = (rows[1:] != rows[:-1]) | (keys[1:] != keys[:-1])
        rows, keys = rows[unique], keys[unique]
        order = np.lexsort((rng.random(len(keys)), rows))
        rows, keys = rows[order], keys[order]
        row_start = np.searchsorted(rows, np.arange(n))
        keep = (np.arange(len(rows)) - row_start[rows]) < counts[rows]
        rows, keys = rows[keep], keys[keep]
        # Canonical (row, key) order.
        order = np.lexsort((keys, rows))
        rows, keys = rows[order], keys[order]
        noise = rng.lognormal(0.0, 1.0, size=len(keys))
        values = np.where(self.is_binary(keys), 1.0, self.value_scale(keys) * noise)
        row_splits = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=n), out=row_splits[1:])
        return row_splits, keys, values

    def _raw_logits(self, features: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
        row_splits, keys, values = features
        # The hidden model sees each value relative to its key's scale, as a normalized
        # model would; binary keys contribute their weight when present.
        relative = np.where(self.is_binary(keys), 1.0, np.log1p(values / self.value_scale(keys)))
        contrib = self.hidden_weight(keys) * relative
        n = len(row_splits) - 1
        rows = np.repeat(np.arange(n), np.diff(row_splits))
        return np.bincount(rows, weights=contrib, minlength=n)

    def sample(self, n: int, stream: int) -> SparseBatch:
        """`n` examples from an independent, reproducible stream."""
        features = self._sample_features(n, stream)
        logits = self.spec.signal_scale * (self._raw_logits(features) - self._logit_mean) / self._logit_std
        rng = np.random.default_rng([self.spec.seed, stream, 1])
        probs = 1.0 / (1.0 + np.exp(-logits))
        labels = (rng.random(n) < probs).astype(np.float32)
        row_splits, keys, values = features
        return SparseBatch(row_splits, keys, values.astype(np.float32), labels)

    def batches(self, batch_size: int, count: int, stream: int = 0) -> list[SparseBatch]:
        """`count` training batches of `batch_size` examples (stream 0 by default)."""
        whole = self.sample(batch_size * count, stream)
        return [whole.slice(i * batch_size, (i + 1) * batch_size) for i in range(count)]

    def held_out(self, n: int) -> SparseBatch:
        """A held-out set from a stream training never uses."""
        return self.sample(n, stream=20_000)


def to_sparse_tensor(batch: SparseBatch, num_features: int):
    """The batch as the `tf.SparseTensor [batch, num_features]` a train step takes."""
    import tensorflow as tf

    return tf.SparseTensor(
        tf.constant(batch.coo_indices(), tf.int64),
        tf.constant(batch.values, tf.float32),
        tf.constant([batch.batch_size, num_features], tf.int64),
    )
