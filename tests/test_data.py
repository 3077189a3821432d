"""Synthetic data: deterministic, production-like, canonical."""

import numpy as np

from sparsebench.plan.spec import DataSpec
from sparsebench.stats import auc
from sparsebench.train.inputs.data import SyntheticData


def test_same_seed_same_data_other_seed_other_data():
    a = SyntheticData(DataSpec(feature_bits=16, seed=1)).sample(500, stream=0)
    b = SyntheticData(DataSpec(feature_bits=16, seed=1)).sample(500, stream=0)
    c = SyntheticData(DataSpec(feature_bits=16, seed=2)).sample(500, stream=0)
    for field in ("row_splits", "keys", "values", "labels"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.keys[:100], c.keys[:100])


def test_shape_of_the_data_matches_production():
    data = SyntheticData(DataSpec(feature_bits=20, mean_active=100, active_sigma=0.5))
    batch = data.sample(4000, stream=0)
    counts = np.diff(batch.row_splits)
    assert 90 < counts.mean() < 110  # mean ~100 active features
    assert np.percentile(counts, 99) > 2 * counts.mean()  # with a tail
    assert np.all((batch.keys >= 0) & (batch.keys < 2**20))
    _, key_counts = np.unique(batch.keys, return_counts=True)
    assert key_counts.max() > 0.3 * 4000 and np.median(key_counts) <= 2  # Zipf: hot head, long tail
    binary = batch.values == 1.0
    assert 0.3 < binary.mean() < 0.7  # binary and continuous mixed
    assert batch.values.max() > 1e6 and batch.values[~binary].min() < 10  # six orders of magnitude
    assert 0.3 < batch.labels.mean() < 0.7


def test_batches_are_canonical_and_keys_unique_per_example():
    batch = SyntheticData(DataSpec(feature_bits=12, mean_active=40)).sample(300, stream=4)
    idx = batch.coo_indices()
    order = np.lexsort((idx[:, 1], idx[:, 0]))
    np.testing.assert_array_equal(order, np.arange(len(idx)))
    assert len(np.unique(idx, axis=0)) == len(idx)


def test_batches_partition_one_stream_and_held_out_is_separate():
    data = SyntheticData(DataSpec(feature_bits=12, mean_active=10))
    batches = data.batches(50, 4)
    whole = data.sample(200, stream=0)
    assert [b.batch_size for b in batches] == [50] * 4
    np.testing.assert_array_equal(np.concatenate([b.keys for b in batches]), whole.keys)
    np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), whole.labels)
    assert not np.array_equal(data.held_out(200).keys[:50], whole.keys[:50])


def test_labels_follow_the_hidden_model():
    data = SyntheticData(DataSpec(feature_bits=14, mean_active=30))
    batch = data.sample(5000, stream=9)
    logits = data._raw_logits((batch.row_splits, batch.keys, batch.values.astype(np.float64)))
    assert auc(batch.labels, logits) > 0.75  # the oracle separates the classes


def test_auc_matches_definition_with_ties():
    labels = np.array([0, 0, 1, 1, 1, 0])
    scores = np.array([0.1, 0.5, 0.5, 0.9, 0.7, 0.3])
    pairs = [(p, n) for p in scores[labels == 1] for n in scores[labels == 0]]
    want = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs])
    assert auc(labels, scores) == want
    assert np.isnan(auc([1, 1], [0.2, 0.3]))
