"""The results file: a torn last line is cut before appending, a failed append is one
clear error, and fingerprints are compared fact by fact."""

import json
import shutil
from pathlib import Path

import pytest

from sparsebench.machine import environment_differences
from sparsebench.record import Record
from sparsebench.results import ResultsError, ResultsWriter, read_results

FIXTURES = Path(__file__).parent / "fixtures"


def torn_copy(tmp_path) -> tuple[Path, int]:
    """A fixture results file whose last line was cut in half (a kill -9 mid-write)."""
    path = tmp_path / "r.jsonl"
    shutil.copy(FIXTURES / "talk.jsonl", path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    return path, len(lines) - 2  # records still complete


def test_appending_after_a_torn_last_line_keeps_the_file_readable(tmp_path):
    path, complete = torn_copy(tmp_path)
    assert "incomplete last line" in read_results(path).warnings[0]
    writer = ResultsWriter(path)
    assert "dropped an incomplete last line" in writer.warnings[0]
    writer.append(Record(cell_id="new-cell", axes={}, status="ok"))
    writer.close()
    results = read_results(path)
    assert results.warnings == []
    assert len(results.records) == complete + 1 and results.records[-1].cell_id == "new-cell"


def test_appending_to_an_intact_file_changes_nothing_before_it(tmp_path):
    path = tmp_path / "r.jsonl"
    shutil.copy(FIXTURES / "talk.jsonl", path)
    before = path.read_bytes()
    with ResultsWriter(path) as writer:
        assert writer.warnings == []
        writer.append(Record(cell_id="x", axes={}, status="ok"))
    assert path.read_bytes().startswith(before)


def test_a_failed_append_is_one_clear_error(tmp_path):
    path = tmp_path / "r.jsonl"
    writer = ResultsWriter(path, lambda: {"run": {}})
    writer._fh.close()
    writer._fh = open("/dev/full", "w")  # every flush fails with ENOSPC
    with pytest.raises(ResultsError, match=r"r\.jsonl: cannot append a record: No space left on device; .*--resume"):
        writer.append(Record(cell_id="x", axes={}, status="ok"))
    writer.close()  # does not raise a second time


def test_nan_is_stored_as_null():
    from sparsebench.results import clean_json

    text = json.dumps(clean_json({"a": float("nan"), "b": [1.0, float("inf")], "c": (2.0,)}), allow_nan=False)
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": [2.0]}


def test_environment_differences_name_each_fact():
    base = {"cpu": {"model": "A"}, "cores_available": 2, "tensorflow": {"version": "2.21.0"}, "gpus": [],
            "worker_variables": {}}
    assert environment_differences(base, base) == []
    other = {**base, "cpu": {"model": "B"}, "worker_variables": {"TF_XLA_FLAGS": "--tf_xla_auto_jit=2"}}
    diffs = environment_differences(base, other)
    assert len(diffs) == 2
    assert diffs[0].startswith("CPU model differs") and "TF_XLA_FLAGS" in diffs[1]


def test_a_nan_loss_is_named_in_the_file_and_shown_as_nan_by_report(tmp_path):
    """JSON stores NaN as null; the record says which figures were not finite, so a diverged
    cell does not read as "not measured"."""
    from fixtures.make_fixtures import cell, ok, write_to

    from sparsebench.analyze import report

    diverged = ok(cell("s", "embedding_lookup_sparse", 256), [100.0, 110.0, 105.0]).replace(loss=float("nan"),
                                                                                           auc=float("inf"))
    path = tmp_path / "r.jsonl"
    write_to(path, [], "s")
    with ResultsWriter(path) as writer:
        writer.append(diverged)
    (stored,) = read_results(path).records
    assert stored.loss is None and stored.non_finite == ["auc", "loss"]
    table = report.build_view(report.load([path]), "matrix").table
    assert list(table["loss"]) == ["NaN"] and list(table["AUC"]) == ["NaN"]


def test_a_second_writer_of_one_file_is_refused_while_the_first_holds_it(tmp_path):
    """Two `--resume` runs of one file: the second gets one line, the first keeps writing."""
    path = tmp_path / "r.jsonl"
    shutil.copy(FIXTURES / "talk.jsonl", path)
    with ResultsWriter(path):
        with pytest.raises(ResultsError, match="another sparsebench is writing this file"):
            ResultsWriter(path)
    ResultsWriter(path).close()  # free again once the first closed


def test_a_cell_measured_twice_in_one_round_is_warned_about(tmp_path):
    path = tmp_path / "r.jsonl"
    lines = (FIXTURES / "talk.jsonl").read_text().splitlines()
    path.write_text("\n".join([*lines, lines[1]]) + "\n")
    results = read_results(path)
    assert any(f":{len(lines) + 1}: cell " in w and "already recorded at line 2" in w for w in results.warnings)
    assert not read_results(FIXTURES / "talk.jsonl").warnings
