"""The statistics `ab` decides with, checked by simulation (fixed seeds, no timing): whole
A/A runs fail at most alpha of the time, and the tests find the slowdowns they say they can."""

import math

import numpy as np
import pytest

from sparsebench.stats import holm, moderated_cells, suite_change

CELLS = 16


def a_a_run(rng, rounds, spread=0.5, typical_sd=0.08, shared_sd=0.0):
    """Per cell and round the log ratio B/A of an A/A run: cells differ in noise (log-normal
    spread of their standard deviations), and a round may move every cell's B alike."""
    sds = np.exp(rng.normal(math.log(typical_sd), spread, CELLS))
    shared = rng.normal(0.0, shared_sd, rounds)
    return [rng.normal(0.0, sd, rounds) + shared for sd in sds]


@pytest.mark.parametrize("rounds", [4, 8])
@pytest.mark.parametrize("spread", [0.0, 0.5, 1.0])
def test_whole_a_a_runs_flag_some_cell_at_most_alpha_of_the_time(rounds, spread):
    rng = np.random.default_rng(1000 * rounds + int(10 * spread))
    runs = 800
    failed = sum(any(c.p_adjusted < 0.05 for c in moderated_cells(a_a_run(rng, rounds, spread), 0.05)[0])
                 for _ in range(runs))
    assert failed / runs <= 0.065  # 5% with the simulation's own sampling error (SE 0.8%)


def test_the_suite_level_test_fails_an_a_a_run_at_most_its_alpha():
    """Also when every round moves all cells' B alike (drift the pairing did not cancel)."""
    rng = np.random.default_rng(7)
    runs = 3000
    failed = sum(suite_change(a_a_run(rng, 6, shared_sd=0.02), 0.01).p_value < 0.01 for _ in range(runs))
    assert failed / runs <= 0.015


@pytest.mark.parametrize("slowdown,power", [(0.05, 0.8), (0.10, 0.99)])
def test_the_suite_level_test_finds_a_uniform_slowdown(slowdown, power):
    """Every cell 5% (10%) slower, 8 rounds, each cell-round +-4%, rounds sharing +-1%."""
    rng = np.random.default_rng(11)
    runs = 500
    found = 0
    for _ in range(runs):
        logs = [x + math.log(1 - slowdown) for x in a_a_run(rng, 8, typical_sd=0.04, shared_sd=0.01)]
        change = suite_change(logs, 0.01)
        found += change.p_value < 0.01 and change.ratio < 1
    assert found / runs >= power


def test_one_slow_cell_is_found_by_its_own_test():
    """One cell of 16 slowed by 10% (6 rounds, +-3% per round): Holm-adjusted, found >= 80%."""
    rng = np.random.default_rng(5)
    runs = 400
    found = 0
    for _ in range(runs):
        logs = a_a_run(rng, 6, spread=0.3, typical_sd=0.03)
        logs[3] = logs[3] + math.log(0.9)
        cells, _, _ = moderated_cells(logs, 0.05)
        found += cells[3].p_adjusted < 0.05 and cells[3].ratio < 1
    assert found / runs >= 0.8


def test_the_detectable_slowdown_is_found_about_80_percent_of_the_time():
    """Plant exactly the slowdown a cell's test says it detects with 80% power: found 70-90%
    of the time (the variance it rests on is itself estimated)."""
    rng = np.random.default_rng(3)
    floors = np.random.default_rng(99)
    planted = -np.mean([moderated_cells(a_a_run(floors, 6, spread=0.0, typical_sd=0.03), 0.05)[0][0].detect_slowdown
                        for _ in range(100)])  # what A/A runs of this machine say, on average
    runs, found = 600, 0
    for _ in range(runs):
        logs = a_a_run(rng, 6, spread=0.0, typical_sd=0.03)
        logs[0] = logs[0] + math.log(1 - planted)
        cell = moderated_cells(logs, 0.05)[0][0]
        found += cell.p_adjusted < 0.05 and cell.ratio < 1
    assert 0.7 <= found / runs <= 0.9


def test_detectable_bounds_are_asymmetric_on_the_ratio_scale():
    cell = moderated_cells(a_a_run(np.random.default_rng(2), 4), 0.05)[0][0]
    assert cell.detect_slowdown < 0 < cell.detect_speedup
    assert math.log1p(cell.detect_speedup) == pytest.approx(-math.log1p(cell.detect_slowdown))
    assert cell.detect_speedup > -cell.detect_slowdown


def test_holm_adjustment():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5]) == [0.5]
