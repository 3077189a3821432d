"""Uncertainty that includes run-to-run noise, on hand-made data (no live timing):
the hierarchical interval, the paired A/B decision, and what a stored-run comparison
says when one process is all a run measured."""

import math

import numpy as np
import pytest
from fixtures.make_fixtures import cell, environment, ok, write_to

from sparsebench import stats
from sparsebench.analyze import report
from sparsebench.analyze.compare import difference_report
from sparsebench.analyze.paired import paired_report
from sparsebench.record import merge_rounds
from sparsebench.results import read_results

TIGHT = [100.0, 101.0, 99.0, 100.5, 99.5, 100.2]


# -- the hierarchical interval -------------------------------------------------------------
def test_processes_that_disagree_widen_the_interval_beyond_the_windows():
    """Five processes with tight windows (CV 0.7%) whose medians spread from 95 to 105: a
    bootstrap of the pooled windows claims about +-1.7%; resampling processes first shows
    the spread of the processes."""
    medians = (95.0, 98.0, 100.0, 102.0, 105.0)
    groups = [[m * w / 100.0 for w in TIGHT] for m in medians]
    summary = stats.summarize_processes(groups)
    pooled_low, pooled_high = stats.bootstrap_median_interval(np.concatenate(groups))
    assert summary["low"] < 96.0 and summary["high"] > 104.0
    assert (summary["high"] - summary["low"]) > 2 * (pooled_high - pooled_low)
    assert summary["between_cv"] == pytest.approx(np.std(medians, ddof=1) / np.mean(medians), rel=0.02)
    assert summary["within_cv"] == pytest.approx(stats.coefficient_of_variation(TIGHT), rel=1e-6)
    assert summary["processes"] == 5 and summary["run_to_run_measured"] is True


def test_one_process_is_the_windows_bootstrap_and_says_run_to_run_was_not_measured():
    summary = stats.summarize_processes([TIGHT])
    assert (summary["low"], summary["high"]) == stats.bootstrap_median_interval(TIGHT)
    assert summary["between_cv"] is None and summary["run_to_run_measured"] is False


def test_hierarchical_interval_covers_the_true_median_when_processes_carry_noise():
    """Each simulated process has its own offset (run-to-run noise, sd 5%) and tight windows
    (1%): the hierarchical interval covers the true median in most trials, the windows'
    bootstrap of one process in few."""
    rng = np.random.default_rng(7)
    hierarchical, single = 0, 0
    trials = 200
    for i in range(trials):
        offsets = rng.normal(0.0, 0.05, size=5)
        groups = [100.0 * math.exp(o) * (1 + rng.normal(0, 0.01, size=6)) for o in offsets]
        low, high = stats.hierarchical_median_interval(groups, seed=i)
        hierarchical += low <= 100.0 <= high
        low, high = stats.bootstrap_median_interval(groups[0], seed=i)
        single += low <= 100.0 <= high
    assert hierarchical / trials >= 0.75
    assert single / trials <= 0.35


def test_merged_record_of_three_rounds():
    c = cell("u", "embedding_lookup_sparse", 256)
    rounds = {r: ok(c, [m * w / 100.0 for w in TIGHT], round=r) for r, m in ((1, 90.0), (2, 100.0), (3, 110.0))}
    rounds[4] = ok(c, TIGHT, round=4).replace(status="failed", reason="worker killed by SIGKILL")
    merged = merge_rounds(rounds)
    assert merged.status == "ok" and merged.processes == 3 and merged.rounds == [1, 2, 3]
    assert merged.run_to_run_measured is True and len(merged.windows) == 18
    assert merged.failed_rounds == [{"round": 4, "status": "failed", "reason": "worker killed by SIGKILL"}]
    assert merged.samples_per_sec_low < 91.0


# -- the paired decision rule ---------------------------------------------------------------
DRIFT = [1.0, 0.8, 1.1, 0.7, 1.05, 0.9]  # the machine's speed, round by round: +-20%


def _side(path, suite, factors, drift=DRIFT, noise=0.01, seed=0):
    """A side of an A/B run: per round one process whose windows are factor x drift."""
    rng = np.random.default_rng(seed)
    records = []
    for r, speed in enumerate(drift, start=1):
        for variant, factor in factors.items():
            windows = list(10000.0 * factor * speed * (1 + rng.normal(0, noise, size=6)))
            records.append(ok(cell(suite, variant, 256), windows, round=r))
    write_to(path, records, suite)
    return read_results(path)


def test_paired_rounds_cancel_drift_and_catch_a_real_slowdown(tmp_path):
    a = _side(tmp_path / "a.jsonl", "ab", {"embedding_lookup_sparse": 1.0, "sparse_dense_matmul": 1.0}, seed=1)
    b = _side(tmp_path / "b.jsonl", "ab", {"embedding_lookup_sparse": 0.8, "sparse_dense_matmul": 1.0}, seed=2)
    rep = paired_report(a, b, max_regression=0.10, alpha=0.01)
    verdicts = {c.cell_id.split("-")[0]: c for c in rep.cells}
    assert verdicts["els"].status == "regressed" and verdicts["els"].ratio == pytest.approx(0.8, abs=0.02)
    assert verdicts["sdm"].status == "unchanged"
    assert verdicts["els"].unit == "rounds" and verdicts["els"].samples == (6, 6)
    assert rep.exit_code == 1


def test_an_unpaired_look_at_the_same_drifting_data_could_not_decide(tmp_path):
    """The drift (+-20% between rounds) swamps a 10% change unless rounds are paired."""
    a = _side(tmp_path / "a.jsonl", "ab", {"embedding_lookup_sparse": 1.0}, seed=1)
    b = _side(tmp_path / "b.jsonl", "ab", {"embedding_lookup_sparse": 0.88}, seed=2)
    paired = paired_report(a, b, max_regression=0.05, alpha=0.01).cells[0]
    assert paired.status == "regressed"
    per_round_a = [r.samples_per_sec for r in a.records]
    per_round_b = [r.samples_per_sec for r in b.records]
    assert stats.welch_log_p(per_round_a, per_round_b) > 0.05  # unpaired: not significant


def four_rounds_with(path, status: str, why: str, variants=()):
    """An ab side of four rounds of two cells: `variants` end with `status` (why) every
    round, the others measure 10,000 samples/s."""
    from sparsebench.record import Record

    records = []
    for r in range(1, 5):
        for variant in ("embedding_lookup_sparse", "sparse_dense_matmul"):
            c = cell("ab", variant, 256)
            records.append(Record.new(c, r, status, why) if variant in variants
                           else ok(c, [10000.0, 10100.0, 9900.0], round=r))
    write_to(path, records, "ab")
    return read_results(path)


def test_a_side_b_that_fails_a_cell_fails_the_gate_and_a_side_a_failure_does_not(tmp_path):
    def side(path, fail):
        return four_rounds_with(path, "failed", "ValueError: batch too large", fail)

    a, b = side(tmp_path / "a.jsonl", ()), side(tmp_path / "b.jsonl", ("sparse_dense_matmul",))
    rep = paired_report(a, b)
    by = {c.cell_id.split("-")[0]: c for c in rep.cells}
    assert by["sdm"].status == "failed" and "B failed in round(s) 1, 2, 3, 4" in by["sdm"].note
    assert rep.exit_code == 1 and "1 FAILED in B: sdm-b256-sgd-cpu" in rep.summary()
    reverse = paired_report(b, a)  # only A (the baseline) failed it: reported, not a failure
    assert {c.cell_id.split("-")[0]: c.status for c in reverse.cells}["sdm"] == "not compared"
    assert reverse.exit_code == 0


def test_a_cell_b_skipped_where_a_measured_it_fails_and_nothing_compared_exits_2(tmp_path):
    """A cell that stops being measured on B (skipped: a missing op, a wrapper valgrind did
    not follow) is no speed-up: it fails. A run where no cell was measured on both sides
    could not check anything: exit 2."""

    def side(path, skipped):
        return four_rounds_with(path, "skipped", "custom op unavailable", skipped)

    both = ("embedding_lookup_sparse", "sparse_dense_matmul")
    rep = paired_report(side(tmp_path / "a.jsonl", ()), side(tmp_path / "b.jsonl", ("sparse_dense_matmul",)))
    by = {c.cell_id.split("-")[0]: c for c in rep.cells}
    assert by["sdm"].status == "failed" and "B skipped in round(s) 1, 2, 3, 4" in by["sdm"].note
    assert rep.exit_code == 1
    nothing = paired_report(side(tmp_path / "a2.jsonl", both), side(tmp_path / "b2.jsonl", both))
    assert nothing.exit_code == 2 and "NOTHING COMPARED" in nothing.summary()


def test_an_a_a_run_flags_nothing_and_reports_the_noise_floor(tmp_path):
    a = _side(tmp_path / "a.jsonl", "ab", {"embedding_lookup_sparse": 1.0}, noise=0.02, seed=3)
    b = _side(tmp_path / "b.jsonl", "ab", {"embedding_lookup_sparse": 1.0}, noise=0.02, seed=4)
    rep = paired_report(a, b, max_regression=0.10, alpha=0.01, aa=True)
    (c,) = rep.cells
    assert c.status == "unchanged" and 0 < c.detectable < 0.10
    assert any("A/A run" in n and f"{c.detectable:.1%}" in n for n in rep.notes)


def test_paired_test_arithmetic():
    result = stats.paired_test([100.0, 200.0, 50.0, 80.0], [90.0, 180.0, 45.0, 72.0])
    assert result.ratio == pytest.approx(0.9) and result.log_sd == pytest.approx(0.0, abs=1e-12)
    assert result.p_value == 0.0
    spread = stats.paired_test([100.0] * 5, [98.0, 102.0, 99.0, 101.0, 100.0])
    assert spread.ratio_low < 1.0 < spread.ratio_high and spread.p_value > 0.5
    assert stats.wilcoxon_min_p(6) == pytest.approx(2 / 64)


def test_wilcoxon_with_too_few_rounds_warns_that_nothing_can_be_flagged(tmp_path):
    a = _side(tmp_path / "a.jsonl", "ab", {"embedding_lookup_sparse": 1.0}, drift=[1.0] * 4, seed=1)
    b = _side(tmp_path / "b.jsonl", "ab", {"embedding_lookup_sparse": 0.5}, drift=[1.0] * 4, seed=2)
    rep = paired_report(a, b, alpha=0.01, test="wilcoxon")
    assert rep.cells[0].status == "unchanged"
    assert "cannot reach p < 0.01" in rep.power_warnings[0]
    assert rep.cells[0].slow_mode is False  # 4 slow processes of 8, all B's: Fisher's p is 1/70, not below 0.005


# -- stored runs: what one process cannot know ----------------------------------------------
def _stored(path, factor, processes, suite="s", seed=0, spread=0.02):
    rng = np.random.default_rng(seed)
    records = []
    for r in range(1, processes + 1):
        offset = math.exp(rng.normal(0, spread))
        windows = list(10000.0 * factor * offset * (1 + rng.normal(0, 0.005, size=6)))
        records.append(ok(cell(suite, "embedding_lookup_sparse", 256), windows, round=r))
    write_to(path, records, suite, environment())
    return read_results(path)


def test_one_process_runs_are_named_and_a_change_below_the_noise_factor_is_not_a_regression(tmp_path):
    base = _stored(tmp_path / "a.jsonl", 1.0, 1)
    cur = _stored(tmp_path / "b.jsonl", 0.85, 1, seed=1)  # -15%: tight windows make it "significant"
    rep = difference_report(base, cur, max_regression=0.10, alpha=0.01, noise_factor=1.25)
    (c,) = rep.cells
    assert c.p_value < 0.01 and c.ratio == pytest.approx(0.85, abs=0.02)
    assert c.status == "unchanged" and c.unit == "windows" and "run-to-run noise unknown" in c.note
    assert sum("one process" in n and "run-to-run" in n for n in rep.notes) == 2  # one note per run
    far = difference_report(base, _stored(tmp_path / "c.jsonl", 0.6, 1, seed=2), noise_factor=1.25)
    assert far.cells[0].status == "regressed"


def test_processes_are_the_unit_when_both_runs_have_several(tmp_path):
    base = _stored(tmp_path / "a.jsonl", 1.0, 4)
    cur = _stored(tmp_path / "b.jsonl", 0.85, 4, seed=1)
    rep = difference_report(base, cur, max_regression=0.10, alpha=0.01, noise_factor=1.25)
    (c,) = rep.cells
    assert c.unit == "processes" and c.samples == (4, 4)
    assert c.status == "regressed"  # -15% with consistent processes: the floor does not apply
    assert not any("one process" in n for n in rep.notes)
    noisy = difference_report(base, _stored(tmp_path / "c.jsonl", 0.85, 4, seed=3, spread=0.25))
    assert noisy.cells[0].status == "unchanged"  # processes that disagree: not significant


# -- the report marks what it does not know ---------------------------------------------------
def test_report_marks_single_process_intervals_and_ties(tmp_path):
    s = "gpu-vs-cpu"
    records = [
        ok(cell(s, "sparse_dense_matmul", 256), [4000.0, 4100.0, 3900.0, 4050.0, 3950.0]),
        ok(cell(s, "embedding_lookup_sparse", 256), [20000.0, 20600.0, 19400.0, 20300.0, 19700.0]),
        ok(cell(s, "embedding_lookup_sparse_fast", 256), [20200.0, 20800.0, 19600.0, 20500.0, 19900.0]),
    ]
    path = tmp_path / "t.jsonl"
    write_to(path, records, s)
    loaded = report.load([path])
    talk = report.build_view(loaded, "talk")
    assert talk.table.iloc[0]["CPU optimized"].endswith(report.TIE_MARK)
    assert any("a tie, not a finding" in n and "els-b256-sgd-cpu" in n for n in talk.notes)
    matrix = report.build_view(loaded, "matrix")
    assert all(v.endswith(report.ONE_PROCESS_MARK) for v in matrix.table["95% interval"])
    assert report.ONE_PROCESS_NOTE in matrix.notes


def test_report_shows_within_and_between_process_spread(tmp_path):
    c = cell("s", "embedding_lookup_sparse", 256)
    path = tmp_path / "p.jsonl"
    write_to(path, [ok(c, [m * w / 100.0 for w in TIGHT], round=r) for r, m in ((1, 95.0), (2, 105.0))], "s")
    matrix = report.build_view(report.load([path]), "matrix")
    row = matrix.table.iloc[0]
    assert row["processes"] == "2" and " / " in row["CV (within / between)"]
    assert not row["95% interval"].endswith(report.ONE_PROCESS_MARK)
    assert report.ONE_PROCESS_NOTE not in matrix.notes


def test_version_1_files_are_read_as_one_process_per_cell():
    results = read_results(__import__("pathlib").Path(__file__).parent / "fixtures" / "talk.jsonl")
    assert results.header["version"] == 1
    assert all(r.round == 1 for r in results.records)
    assert all(r.processes in (0, 1) for r in results.latest())


def test_a_shared_shift_is_one_finding_and_cells_are_judged_beyond_it(tmp_path):
    """Five one-process cells all 30% slower, one of them 2.5x slower: the shift is the
    whole run's regression (exit 1), and only the cell that halved beyond it is flagged."""
    variants = ["embedding_lookup_sparse", "sparse_dense_matmul", "row_partitioned", "col_partitioned",
                "ragged_embedding_lookup"]

    def run(path, factors):
        rng = np.random.default_rng(len(str(path)))
        records = [ok(cell("s", v, 256), list(10000.0 * f * (1 + rng.normal(0, 0.005, size=6))))
                   for v, f in zip(variants, factors)]
        write_to(path, records, "s")
        return read_results(path)

    base = run(tmp_path / "a.jsonl", [1.0] * 5)
    cur = run(tmp_path / "b.jsonl", [0.7, 0.7, 0.7, 0.7, 0.7 / 2.5])
    rep = difference_report(base, cur)
    assert rep.shift == pytest.approx(-0.3, abs=0.01) and rep.shift_status == "regressed"
    assert [c.status for c in rep.cells] == ["unchanged"] * 4 + ["regressed"]
    assert rep.exit_code == 1 and "the whole run regressed" in rep.summary()
    drift = difference_report(base, run(tmp_path / "c.jsonl", [0.88] * 5))  # -12%: the machine
    assert drift.shift_status == "unchanged" and drift.exit_code == 0
    assert all(c.status == "unchanged" for c in drift.cells)


def test_measurements_beside_other_load_are_named(tmp_path):
    a = _side(tmp_path / "a.jsonl", "ab", {"embedding_lookup_sparse": 1.0}, seed=1)
    b = _side(tmp_path / "b.jsonl", "ab", {"embedding_lookup_sparse": 1.0}, seed=2)
    b.records[2] = b.records[2].replace(other_cores=0.9)
    rep = paired_report(a, b)
    assert any("1 cell measurement(s) ran beside other load" in w and "side B, round 3: 0.9 other cores" in w
               for w in rep.power_warnings)
    assert not any("other load" in w for w in paired_report(a, a).power_warnings)
