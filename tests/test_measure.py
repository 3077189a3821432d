"""The measurement loop and its statistics, with a fake clock: no real timing asserted."""

import numpy as np
import pytest

from sparsebench import stats
from sparsebench.plan.spec import MeasureSpec
from sparsebench.train.hogwild import run_hogwild
from sparsebench.train.measure import measure


class FakeClock:
    """Advances only when a step runs: each step 'takes' the next duration in the list."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_windows_exclude_warmup_and_keep_every_window():
    clock = FakeClock()
    durations = iter([5.0] * 2 + [0.1] * 4 + [0.2] * 4 + [0.1] * 4)  # warm-up steps are slow
    calls = []

    def step(batch):
        calls.append(batch)
        clock.now += next(durations)
        return batch

    result = measure(step, [(i,) for i in range(3)], batch_size=10,
                     settings=MeasureSpec(warmup_steps=2, windows=3, steps_per_window=4, seconds_per_window=None),
                     clock=clock)
    assert result.warmup_seconds == pytest.approx(10.0)
    assert result.window_steps == [4, 4, 4]
    np.testing.assert_allclose(result.window_samples_per_sec, [100.0, 50.0, 100.0])
    assert len(result.step_seconds) == 12 and max(result.step_seconds) == pytest.approx(0.2)
    assert calls[:4] == [0, 1, 2, 0]  # batches cycle, warm-up included


def test_seconds_per_window_stops_on_time():
    clock = FakeClock()

    def step():
        clock.now += 0.25

    result = measure(step, [()], batch_size=4,
                     settings=MeasureSpec(warmup_steps=0, windows=2, steps_per_window=None, seconds_per_window=1.0),
                     clock=clock)
    assert result.window_steps == [4, 4]
    np.testing.assert_allclose(result.window_samples_per_sec, [16.0, 16.0])


def test_hogwild_workers_take_distinct_batches():
    seen = []
    run_hogwild(lambda b: seen.append(b), [(i,) for i in range(8)], workers=4, steps_per_worker=2)
    assert sorted(seen) == list(range(8))


def test_summary_statistics():
    windows = [100.0, 110.0, 90.0, 105.0, 95.0]
    summary = stats.summarize_throughput(windows)
    assert summary["median"] == 100.0
    assert summary["low"] <= 100.0 <= summary["high"]
    assert 90.0 <= summary["low"] and summary["high"] <= 110.0
    assert summary["cv"] == pytest.approx(np.std(windows, ddof=1) / np.mean(windows))
    assert stats.bootstrap_median_interval(windows) == stats.bootstrap_median_interval(windows)  # seeded
    assert stats.percentiles([1, 2, 3, 4, 100])["p50"] == 3
    assert np.isnan(stats.coefficient_of_variation([1.0]))
