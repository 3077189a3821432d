"""The measurement loop and its statistics, with a fake clock: no real timing asserted."""

import time

import numpy as np
import pytest

from sparsebench import stats
from sparsebench.plan.spec import MeasureSpec
from sparsebench.train.measure.hogwild import run_hogwild
from sparsebench.train.measure.windows import measure


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
    assert summary["low"] < 100.0 < summary["high"]
    assert summary["cv"] == pytest.approx(np.std(windows, ddof=1) / np.mean(windows))
    assert stats.bootstrap_median_interval(windows) == stats.bootstrap_median_interval(windows)  # seeded
    assert stats.percentiles([1, 2, 3, 4, 100])["p50"] == 3
    assert np.isnan(stats.coefficient_of_variation([1.0]))


def test_windows_count_every_hogwild_workers_steps():
    """3 workers: a window holds each worker's steps; throughput is all of them over the
    window's wall time. Each step advances a shared fake clock by 0.1 s under a lock, so
    the arithmetic is exact whatever the interleaving."""
    import threading

    clock, lock = FakeClock(), threading.Lock()
    seen = []

    def step(batch):
        with lock:
            clock.now += 0.1
            seen.append(batch)

    result = measure(step, [(i,) for i in range(6)], batch_size=8,
                     settings=MeasureSpec(warmup_steps=6, windows=2, steps_per_window=4), workers=3, clock=clock)
    assert result.warmup_seconds == pytest.approx(0.6)  # 6 // 3 = 2 warm-up steps per worker
    assert result.window_steps == [12, 12]
    np.testing.assert_allclose(result.window_seconds, [1.2, 1.2])
    np.testing.assert_allclose(result.window_samples_per_sec, [12 * 8 / 1.2] * 2)
    assert len(result.step_seconds) == 24
    assert sorted(seen) == sorted([0, 1, 2, 3, 4, 5] * 5)  # warm-up and windows: 30 steps cycling 6 batches


def test_bootstrap_interval_covers_the_true_median_about_95_percent_of_the_time():
    """Coverage over many seeded samples of a known distribution: an interval that were
    always [min, max] (or a point) would miss this band."""
    rng = np.random.default_rng(42)
    trials, covered, widths = 300, 0, []
    for i in range(trials):
        sample = rng.normal(100.0, 10.0, size=25)  # true median 100
        low, high = stats.bootstrap_median_interval(sample, seed=i)
        covered += low <= 100.0 <= high
        widths.append((high - low) / (sample.max() - sample.min()))
    assert 0.88 <= covered / trials <= 0.99
    assert np.median(widths) < 0.5  # far narrower than the sample's range


def test_on_windows_start_runs_after_warm_up_and_before_the_first_timed_step():
    """What a GPU sampler hooks on, so its averages leave warm-up (tracing) out."""
    events = []
    measure(lambda: events.append("step"), [()], batch_size=1,
            settings=MeasureSpec(warmup_steps=3, windows=1, steps_per_window=2),
            on_windows_start=lambda: events.append("start"))
    assert events == ["step"] * 3 + ["start"] + ["step"] * 2


def test_a_window_in_which_no_step_finished_fails_instead_of_recording_zero():
    """A clock that moves past the window before the first step (a window shorter than a
    step): the cell must not record `ok` at 0 samples/s."""
    from sparsebench.train.measure.windows import EmptyWindow

    ticks = iter(range(10_000))
    with pytest.raises(EmptyWindow, match="timed window 1 ran no step"):
        measure(lambda batch: batch, [(0,)], batch_size=10,
                settings=MeasureSpec(warmup_steps=0, windows=2, seconds_per_window=0.5),
                clock=lambda: float(next(ticks)))


def test_a_window_shorter_than_the_clock_can_time_is_a_config_error():
    from sparsebench.errors import ConfigError

    with pytest.raises(ConfigError, match="seconds_per_window: must be at least 0.01 s"):
        MeasureSpec(seconds_per_window=1e-300).validate()


def test_every_window_records_its_cpu_seconds_beside_its_wall_seconds():
    """A fake CPU clock that runs at half the wall clock (the process was scheduled half the
    time): the windows' CPU rates are twice their wall rates, and the record says so."""
    from sparsebench.train.cell import cpu_fields

    clock = FakeClock()

    def step(batch):
        clock.now += 0.1
        return batch

    result = measure(step, [(0,)], batch_size=10,
                     settings=MeasureSpec(warmup_steps=0, windows=3, steps_per_window=4), clock=clock,
                     cpu_clock=lambda: clock.now / 2)
    np.testing.assert_allclose(result.window_seconds, [0.4] * 3)
    np.testing.assert_allclose(result.window_cpu_seconds, [0.2] * 3)
    fields = cpu_fields(result)
    np.testing.assert_allclose(fields["cpu_windows"], [200.0] * 3)
    assert fields["cpu_samples_per_sec"] == pytest.approx(200.0) and fields["cpu_busy_cores"] == pytest.approx(0.5)


def test_thread_cpu_seconds_name_this_process_threads():
    """0.3 CPU-seconds spun on this thread show up under its name (to clock-tick precision)."""
    from sparsebench.train.measure.cputime import thread_cpu_difference, thread_cpu_seconds

    before = thread_cpu_seconds()
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass
    spent = thread_cpu_difference(before, thread_cpu_seconds())
    assert spent is not None and max(spent.values()) >= 0.25


def test_interference_is_the_machines_busy_time_beyond_this_process():
    from sparsebench.train.measure.cputime import interference, machine_cpu_seconds

    # 2 s of wall: the machine was busy 3.0 CPU-s (0.5 of it stolen), this process used 1.5
    other, steal = interference((100.0, 10.0), (103.0, 10.5), own_cpu=1.5, wall=2.0)
    assert other == pytest.approx(0.5) and steal == pytest.approx(0.25)
    assert interference(None, (1.0, 0.0), 0.5, 1.0) == (None, None)
    # a window shorter than 20 of /proc/stat's 10 ms ticks says nothing (it read 3.2 other
    # cores of 2 over 3 ms): no figure rather than a false busy warning
    assert interference((100.0, 10.0), (100.01, 10.0), own_cpu=0.0, wall=0.003) == (None, None)
    reading = machine_cpu_seconds()
    assert reading is None or (reading[0] >= 0 and reading[1] >= 0)
