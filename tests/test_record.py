"""The typed record and job: every field declared once with a unit and a merge rule, the
merge driven by those declarations, JSON unchanged for files written before the type, the
documentation checked against the declarations, and a job that refuses unknown keys."""

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest

from sparsebench.errors import ConfigError
from sparsebench.plan.job import Job, ProfileRequest, RemoteCluster
from sparsebench.plan.suite import load_suite
from sparsebench.record import FIELDS, Merge, Record, cell_rate, declarations, merge_rounds, process_rate
from sparsebench.results import read_results

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
V2 = FIXTURES / "v2"


def _cell():
    return load_suite(str(FIXTURES / "tiny.toml")).cells()[0]


# -- declarations ------------------------------------------------------------------------------
def test_every_field_declares_a_unit_a_merge_rule_and_a_meaning():
    for f in FIELDS:
        assert isinstance(f.metadata.get("merge"), Merge), f.name
        assert isinstance(f.metadata.get("unit"), str), f.name
        assert f.metadata.get("doc"), f.name


def test_a_new_per_process_field_is_merged_by_its_rule_and_one_without_a_rule_is_refused():
    def field(merge):
        return dataclasses.field(default=None, metadata={"unit": "ms", "merge": merge, "doc": "test"})

    @dataclasses.dataclass
    class WithFields(Record):
        queue_ms: float = field(Merge.MEDIAN)
        peak_queue: float = field(Merge.MAX)
        queue_trace: list = field(Merge.EACH)

    cell = _cell()
    rounds = {r: WithFields(**vars(Record.new(cell, r, "ok", windows=[100.0 * r] * 3, samples_per_sec=100.0 * r)),
                            queue_ms=q, peak_queue=p, queue_trace=[r])
              for r, q, p in ((1, 3.0, 7.0), (2, 1.0, 9.0), (3, 2.0, 8.0))}
    merged = merge_rounds(rounds, WithFields)
    assert merged.queue_ms == 2.0 and merged.peak_queue == 9.0 and merged.queue_trace == [[1], [2], [3]]
    assert merged.processes == 3 and merged.samples_per_sec == 200.0

    @dataclasses.dataclass
    class Unruled(Record):
        forgotten: float = None

    with pytest.raises(TypeError, match="Unruled.forgotten declares no merge rule"):
        merge_rounds({1: Unruled(**vars(Record.new(cell, 1, "ok", windows=[1.0])))}, Unruled)


def test_a_record_refuses_an_undeclared_field_where_it_is_built():
    with pytest.raises(TypeError, match="no field 'samples_per_second'"):
        Record.new(_cell(), 1, "ok", samples_per_second=1.0)


def test_fields_that_must_agree_and_do_not_are_listed():
    cell = _cell()
    a = Record.new(cell, 1, "ok", windows=[1.0], grad_type="dense")
    b = Record.new(cell, 2, "ok", windows=[1.0], grad_type="IndexedSlices")
    assert merge_rounds({1: a, 2: b}).disagreements == ["grad_type"]


def test_json_round_trip_keeps_unknown_keys_and_omits_nulls():
    record = Record.new(_cell(), 1, "ok", windows=[1.0, 2.0], auc=None)
    payload = {**record.to_dict(), "from_the_future": {"x": 1}}
    back = Record.from_dict(json.loads(json.dumps(payload)))
    assert back.extra == {"from_the_future": {"x": 1}} and back.windows == [1.0, 2.0]
    assert back.to_dict() == json.loads(json.dumps(payload))
    assert "auc" not in payload and payload["reason"] is None  # nulls omitted, but the always-written ones


def test_the_four_rates_are_named_apart():
    cell = _cell()
    rounds = {1: Record.new(cell, 1, "ok", windows=[10.0, 20.0, 30.0], samples_per_sec=20.0),
              2: Record.new(cell, 2, "ok", windows=[40.0, 50.0, 60.0], samples_per_sec=50.0)}
    assert process_rate([10.0, 20.0, 30.0]) == 20.0
    merged = merge_rounds(rounds)
    assert merged.samples_per_sec == cell_rate([[10.0, 20.0, 30.0], [40.0, 50.0, 60.0]]) == 35.0
    assert merged.process_medians == [20.0, 50.0]


# -- the documentation ---------------------------------------------------------------------------
def test_the_results_format_document_lists_every_field_with_its_unit_and_rule():
    text = (ROOT / "docs" / "results-format.md").read_text()
    rows = {}
    for line in text.splitlines():
        match = re.match(r"\|\s*`(\w+)`\s*\|([^|]*)\|([^|]*)\|", line)
        if match:
            rows[match.group(1)] = (match.group(2).strip(), match.group(3).strip())
    declared = {d["name"]: (d["unit"], d["merge"]) for d in declarations()}
    assert set(rows) == set(declared), (set(declared) - set(rows), set(rows) - set(declared))
    for name, (unit, merge) in declared.items():
        assert rows[name] == (unit or "", merge), name


# -- files written before the type --------------------------------------------------------------
def test_report_json_of_files_written_before_the_record_type_is_unchanged(tmp_path, capsys):
    from sparsebench.cli import main

    for name in ("v2-tiny.jsonl", "v2-files.jsonl", "v2-timeout.jsonl"):
        shutil.copy(V2 / name, tmp_path / name)
    with pytest.raises(SystemExit) as done:
        main(["report", *(str(tmp_path / n) for n in ("v2-tiny.jsonl", "v2-files.jsonl", "v2-timeout.jsonl")),
              "--format", "json"])
    assert done.value.code == 0
    printed, before = json.loads(capsys.readouterr().out), json.loads((V2 / "report.json").read_text())
    # Keys are added to the JSON view, never renamed (results.JSON_KEYS): what the old files
    # printed is printed the same, in the same order, and the keys added since are null.
    for row, old in zip(printed, before, strict=True):
        added = [key for key in row if key not in old]
        assert added == list(KEYS_ADDED_SINCE_V2_FIXTURES) and all(row[key] is None for key in added)
        assert list(row.items())[:len(old)] == list(old.items())


KEYS_ADDED_SINCE_V2_FIXTURES = ("cpu_samples_per_sec", "cpu_busy_cores", "bound_samples_per_sec", "bound_share",
                                "nonfinite_inputs", "input_cpu_us_per_example", "input_cpu_share",
                                "text_parser")


def test_records_written_before_the_type_read_back_to_the_same_json():
    for name in ("v2-tiny.jsonl", "v2-files.jsonl", "v2-timeout.jsonl"):
        lines = (V2 / name).read_text().splitlines()[1:]
        for line, record in zip(lines, read_results(V2 / name).records):
            original = json.loads(line)
            assert record.extra == {}, sorted(record.extra)  # every key ever written is declared
            written = record.to_dict()
            assert written == {k: v for k, v in original.items() if v is not None or k in written}


def test_processes_of_a_pipeline_cell_merge_their_input_figures_by_rule(tmp_path):
    """Before the Record type the merged record kept the last process's input figures."""
    header, *records = (V2 / "v2-files.jsonl").read_text().splitlines()
    pipeline = json.loads(next(r for r in records if '"input": "pipeline"' in r))
    first = {**pipeline, "round": 1, "input_samples_per_sec": 8000.0, "input_wait_share": 0.45, "input_bound": True}
    second = {**pipeline, "round": 2, "input_samples_per_sec": 20000.0, "input_wait_share": 0.05,
              "input_bound": False}
    path = tmp_path / "two.jsonl"
    path.write_text("\n".join([header, json.dumps(first), json.dumps(second)]) + "\n")
    (merged,) = read_results(path).latest()
    assert merged.input_samples_per_sec == 14000.0 and merged.input_wait_share == pytest.approx(0.25)
    assert merged.input_bound is True  # recomputed: the median wait share is 25%, over the 20% bound
    assert merged.input_windows == [pipeline["input_windows"]] * 2


# -- the job --------------------------------------------------------------------------------------
def test_a_job_round_trips_and_refuses_unknown_keys(tmp_path):
    job = Job(cells=(_cell(),), isolation="env", round=3, lockstep=True, private_network=True,
              cluster=RemoteCluster({"chief": ["a:1"], "ps": ["b:2"], "worker": ["c:3"]}, "c.json"),
              profile=ProfileRequest(7, "/tmp/p"))
    job.write(tmp_path / "job.json")
    assert Job.read(tmp_path / "job.json") == job
    payload = json.loads(job.to_json())
    with pytest.raises(ConfigError, match="job.first_index: unknown key"):
        Job.from_json(json.dumps({**payload, "first_index": 2}))
    with pytest.raises(ConfigError, match="job.profile.logdir: unknown key"):
        Job.from_json(json.dumps({**payload, "profile": {"steps": 1, "dir": "x", "logdir": "y"}}))


def test_cpu_figures_of_a_cells_processes_merge_by_their_rules():
    from sparsebench.record import merge_rounds

    from sparsebench.plan.cell import Cell
    from sparsebench.plan.spec import ModelSpec

    c = Cell("s", 8, ModelSpec())
    rounds = {r: Record.new(c, r, "ok", windows=[100.0 * r], cpu_windows=[200.0 * r], cpu_samples_per_sec=200.0 * r,
                            window_cpu_seconds=[0.5], cpu_busy_cores=0.5 + r / 10, samples_per_sec=100.0 * r)
              for r in (1, 2, 3)}
    merged = merge_rounds(rounds)
    assert merged.cpu_samples_per_sec == 400.0 and merged.cpu_busy_cores == pytest.approx(0.7)
    assert merged.cpu_windows == [[200.0], [400.0], [600.0]] and merged.window_cpu_seconds == [[0.5]] * 3
