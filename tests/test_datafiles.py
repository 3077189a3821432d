"""Examples from files: the three formats agree, gzip agrees, bad input is counted and
named, a missing source stops the run before any worker, and `data inspect` recovers the
generator's settings."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from sparsebench.plan.spec import DataSpec
from sparsebench.train.inputs.data import SyntheticData
from sparsebench.train.inputs.datafiles import WRITERS, read

ROOT = Path(__file__).resolve().parent.parent


def env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}


def same(a, b):
    assert a.batch_size == b.batch_size
    np.testing.assert_array_equal(a.coo_indices(), b.coo_indices())
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.labels, b.labels)


@pytest.fixture(scope="module")
def examples():
    return SyntheticData(DataSpec(feature_bits=12, mean_active=20)).sample(300, stream=0)


@pytest.mark.parametrize("fmt", ["libsvm", "tfrecord"])
@pytest.mark.parametrize("compress", [False, True])
def test_libsvm_and_tfrecord_give_back_the_examples_written(tmp_path, examples, fmt, compress):
    path = tmp_path / f"x.{fmt}"
    WRITERS[fmt](examples, path, compress=compress)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == compress
    batch, report = read(str(path), fmt, 12)
    assert report.bad == 0 and report.examples == 300
    same(batch, examples)


def test_criteo_examples_load_identically_from_all_three_formats_plain_or_gzip(tmp_path, examples):
    WRITERS["criteo"](examples, tmp_path / "c.tsv")
    WRITERS["criteo"](examples, tmp_path / "c.tsv.gz", compress=True)
    criteo, report = read(str(tmp_path / "c.tsv"), "criteo", 12)
    assert report.bad == 0 and criteo.batch_size == 300
    same(read(str(tmp_path / "c.tsv.gz"), "criteo", 12)[0], criteo)
    active = np.diff(criteo.row_splits)
    assert active.max() <= 39 and criteo.values.min() >= 0
    for fmt in ("libsvm", "tfrecord"):
        WRITERS[fmt](criteo, tmp_path / f"c.{fmt}")
        same(read(str(tmp_path / f"c.{fmt}"), fmt, 12)[0], criteo)


def test_criteo_columns_and_empty_fields(tmp_path):
    line = "1\t5\t\t-1" + "\t" * 10 + "\t68fd1e64" + "\t" * 25 + "\n"  # 3 ints (one empty), 1 category
    (tmp_path / "c.tsv").write_text(line)
    batch, report = read(str(tmp_path / "c.tsv"), "criteo", 20)
    assert report.bad == 0 and batch.labels.tolist() == [1.0]
    assert sorted(batch.values.tolist()) == [-1.0, 1.0, 5.0] and batch.nnz == 3


def test_malformed_lines_are_counted_and_named(tmp_path, examples):
    good = tmp_path / "x.libsvm"
    WRITERS["libsvm"](examples.slice(0, 98), good)
    lines = good.read_text().splitlines()
    lines.insert(10, "1 12:oops")
    lines.insert(50, "1 7")
    (tmp_path / "bad.libsvm").write_text("\n".join(lines) + "\n")
    batch, report = read(str(tmp_path / "bad.libsvm"), "libsvm", 12)
    assert batch.batch_size == 98 and report.bad == 2
    assert report.first_bad[0].startswith(f"{tmp_path / 'bad.libsvm'}:11:") and ":51:" in report.first_bad[1]
    assert abs(report.bad_fraction - 0.02) < 1e-12


SUITE = """
name = "files"
[data]
feature_bits = 12
source = "{source}"
format = "libsvm"
max_bad_fraction = {fraction}
[model]
out_dim = 4
hidden_units = [4]
[measure]
warmup_steps = 1
windows = 1
steps_per_window = 2
batch_pool = 2
eval_examples = 100
diagnostic_steps = 1
[matrix]
batch_size = [64]
variant = ["embedding_lookup_sparse"]
"""


def _run(tmp_path, source, fraction, name):
    (tmp_path / f"{name}.toml").write_text(SUITE.format(source=source, fraction=fraction))
    return subprocess.run([sys.executable, "-m", "sparsebench", "run", "--suite", str(tmp_path / f"{name}.toml"),
                           "--quiet", "--output", str(tmp_path / f"{name}.jsonl")], capture_output=True, text=True,
                          env=env(), cwd=tmp_path, timeout=300)


@pytest.mark.slow
def test_the_bad_fraction_threshold_fails_the_cell_and_below_it_trains(tmp_path):
    batch = SyntheticData(DataSpec(feature_bits=12, mean_active=20)).sample(400, stream=0)
    WRITERS["libsvm"](batch, tmp_path / "x.libsvm")
    lines = (tmp_path / "x.libsvm").read_text().splitlines()
    lines.insert(3, "not a label")
    (tmp_path / "x.libsvm").write_text("\n".join(lines) + "\n")
    strict = _run(tmp_path, tmp_path / "x.libsvm", 0.001, "strict")
    assert strict.returncode == 1
    record = json.loads((tmp_path / "strict.jsonl").read_text().splitlines()[1])
    assert record["status"] == "failed" and "1 of 129 examples malformed" in record["reason"]
    assert f"{tmp_path / 'x.libsvm'}:4" in record["reason"]
    lenient = _run(tmp_path, tmp_path / "x.libsvm", 0.01, "lenient")
    assert lenient.returncode == 0, lenient.stderr[-2000:]
    record = json.loads((tmp_path / "lenient.jsonl").read_text().splitlines()[1])
    assert record["status"] == "ok" and record["data_source"]["read"]["bad"] == 1
    assert record["data_source"]["pool_batches"] == 2 and "first 100" in record["data_source"]["held_out"]


def test_a_missing_source_is_one_line_exit_2_and_no_results_file(tmp_path):
    done = _run(tmp_path, tmp_path / "nope.libsvm", 0.001, "missing")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "nope.libsvm: no such file" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "missing.jsonl").exists()


@pytest.mark.slow
def test_inspect_recovers_the_generators_settings(tmp_path):
    path = tmp_path / "x.tfrecord.gz"
    done = subprocess.run([sys.executable, "-m", "sparsebench", "data", "write", str(path), "--format", "tfrecord",
                           "--examples", "20000", "--feature-bits", "18", "--mean-active", "50",
                           "--zipf-exponent", "1.05"], capture_output=True, text=True, env=env(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    done = subprocess.run([sys.executable, "-m", "sparsebench", "data", "inspect", str(path), "--format", "tfrecord",
                           "--feature-bits", "18", "--json"], capture_output=True, text=True, env=env(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts["examples"] == 20000
    assert abs(facts["active_per_example"]["mean"] - 50) / 50 < 0.10
    assert abs(facts["zipf_exponent"] - 1.05) < 0.15


# -- the pipeline reads what the memory path reads -----------------------------------------------
def text_parser(parser: str):
    """The C++ parser's function (built or found; skipped where it cannot be), or None for
    TensorFlow's string ops."""
    if parser == "tf.strings":
        return None
    from conftest import require_custom_op

    require_custom_op()
    from sparsebench.train.custom_ops.ops import parse_text

    return parse_text


@pytest.mark.parametrize("fmt,parser", [("libsvm", "op"), ("libsvm", "tf.strings"), ("tfrecord", "op"),
                                        ("criteo", "op"), ("criteo", "tf.strings")])
def test_the_pipeline_yields_the_batches_the_memory_path_loads(tmp_path, examples, fmt, parser):
    """Traced tf.data parsing (the graph the timed loop pulls from; text by the C++ op or by
    tf.strings) against the Python readers: same examples, held-out ones skipped the same
    way, malformed lines dropped."""
    import tensorflow as tf

    from sparsebench.plan.cell import Cell
    from sparsebench.plan.spec import MeasureSpec, ModelSpec
    from sparsebench.train.inputs.open import open_input

    path = tmp_path / f"x.{fmt}.gz"
    WRITERS[fmt](examples, path, compress=True)
    if fmt != "tfrecord":  # a blank and a malformed line (and a libsvm comment), inside the held-out part
        import gzip

        lines = gzip.open(path, "rt").read().splitlines()
        # "nan" is a number to Python, not to the shared line pattern: malformed on both paths.
        lines[5:5] = ["# a comment", "", "1 3:x", "1 3:nan"] if fmt == "libsvm" else ["", "1\t2\tzz"]
        with gzip.open(path, "wt", newline="") as fh:  # Criteo with CRLF line ends
            fh.write(("\n" if fmt == "libsvm" else "\r\n").join(lines) + "\n")
    # Criteo hashes (column, value) pairs: 2**24 keys keep two of one example from colliding
    # (a collision is the one documented difference: memory keeps the last value, the pipeline both).
    spec = DataSpec(feature_bits=24 if fmt == "criteo" else 12, source=str(path), format=fmt, input="pipeline",
                    max_bad_fraction=0.5, text_parser=parser)
    measure = MeasureSpec(batch_pool=2, eval_examples=50)
    memory = open_input(Cell("t", 64, ModelSpec(), replace(spec, input="memory"), measure=measure))
    piped = open_input(Cell("t", 64, ModelSpec(), spec, measure=measure), text_parser(parser))
    same(piped.held_out, memory.held_out)
    assert piped.facts["read"]["bad"] == {"tfrecord": 0, "criteo": 1, "libsvm": 2}[fmt]
    assert piped.facts["read"]["examples"] == 300 and piped.pool == [] and len(memory.pool) == 2
    iterator = iter(piped.dataset())
    for expected in memory.pool:
        sp, labels = next(iterator)
        assert isinstance(sp, tf.SparseTensor)
        np.testing.assert_array_equal(sp.indices.numpy(), expected.coo_indices())
        np.testing.assert_array_equal(sp.values.numpy(), expected.values)
        np.testing.assert_array_equal(labels.numpy(), expected.labels)


@pytest.mark.slow
def test_a_pipeline_cell_trains_and_says_whether_it_is_input_bound(tmp_path):
    batch = SyntheticData(DataSpec(feature_bits=12, mean_active=20)).sample(1200, stream=0)
    WRITERS["tfrecord"](batch, tmp_path / "x.tfrecord")
    suite = SUITE.replace('format = "libsvm"', 'format = "tfrecord"').replace(
        'variant = ["embedding_lookup_sparse"]', 'variant = ["embedding_lookup_sparse"]\ninput = ["memory", "pipeline"]')
    (tmp_path / "p.toml").write_text(suite.format(source=tmp_path / "x.tfrecord", fraction=0.001))
    done = subprocess.run([sys.executable, "-m", "sparsebench", "run", "--suite", str(tmp_path / "p.toml"), "--output",
                           str(tmp_path / "p.jsonl")], capture_output=True, text=True, env=env(), cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = {r["axes"]["input"]: r for r in map(json.loads, (tmp_path / "p.jsonl").read_text().splitlines()[1:])}
    assert records["memory"]["status"] == records["pipeline"]["status"] == "ok"
    pipe = records["pipeline"]
    assert pipe["data_source"]["input"] == "pipeline" and pipe["input_samples_per_sec"] > 0
    assert isinstance(pipe["input_bound"], bool) and 0 <= pipe["input_wait_share"] <= 1
    assert pipe["input_cpu_us_per_example"] > 0 and pipe["input_cpu_share"] > 0
    assert pipe["data_source"]["parsing"] == "per batch" and pipe["data_source"]["tf_data"]["autotune"] is True
    assert "input alone" in done.stdout and "µs CPU/example" in done.stdout and records["memory"].get("input_samples_per_sec") is None


def test_without_a_compiler_a_text_op_cell_is_skipped_and_the_tf_strings_cell_trains(tmp_path):
    batch = SyntheticData(DataSpec(feature_bits=12, mean_active=20)).sample(400, stream=0)
    WRITERS["libsvm"](batch, tmp_path / "x.libsvm")
    suite = SUITE.replace('variant = ["embedding_lookup_sparse"]',
                          'variant = ["embedding_lookup_sparse"]\ninput = ["pipeline"]\ntext_parser = ["op", "tf.strings"]')
    (tmp_path / "p.toml").write_text(suite.format(source=tmp_path / "x.libsvm", fraction=0.001))
    done = subprocess.run([sys.executable, "-m", "sparsebench", "run", "--suite", str(tmp_path / "p.toml"), "--quiet",
                           "--output", str(tmp_path / "p.jsonl")], capture_output=True, text=True, cwd=tmp_path,
                          env={**env(), "CXX": "/nonexistent/c++", "SPARSEBENCH_OPS_CACHE": str(tmp_path / "cache")},
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()[1:]]
    by_parser = {("tfstrings" in r["cell_id"]): r for r in records}
    assert by_parser[False]["status"] == "skipped"
    assert by_parser[False]["reason"].startswith("custom op unavailable: C++ compiler '/nonexistent/c++' not found")
    assert by_parser[True]["status"] == "ok" and by_parser[True]["data_source"]["text_parser"] == "tf.strings"


def test_a_tfrecord_pipeline_cell_with_its_own_feature_names_calibrates_its_discretizer(tmp_path):
    """The calibration sample is read with the cell's feature names (it was read with the
    default names, found no example, and the discretizer silently calibrated nothing)."""
    from sparsebench.plan.cell import Cell
    from sparsebench.plan.spec import MeasureSpec, ModelSpec
    from sparsebench.train.cell import prepare
    from sparsebench.train.inputs.datafiles import TFRecordNames

    examples = SyntheticData(DataSpec(feature_bits=10, mean_active=20)).sample(600, stream=0)
    names = TFRecordNames("my_ids", "my_values", "my_label")
    WRITERS["tfrecord"](examples, tmp_path / "x.tfrecord", names=names)
    spec = DataSpec(feature_bits=10, source=str(tmp_path / "x.tfrecord"), format="tfrecord", input="pipeline",
                    ids_feature="my_ids", values_feature="my_values", label_feature="my_label")
    cell = Cell("t", 32, ModelSpec(discretizer=True, n_bin=4, out_dim=4, hidden_units=(4,)), spec,
                measure=MeasureSpec(eval_examples=100))
    prepared = prepare(cell)
    assert prepared.input.calibration_sample.batch_size == 500  # every example after the held-out ones
    assert len(prepared.calibration.keys) > 0
    sp, _ = prepared.input.batches[0]
    assert prepared.trainer.train_step(sp, _).numpy() > 0  # the traced step trains on the discretized keys


# Lines that look like data and are not: each must be a counted bad line on both paths, never
# a crash mid-run, an `inf` in the table, or a line split in two.
HOSTILE_LIBSVM = [
    "1 5:1e999 6:1",  # inf in float32 (and in float64)
    "1 5:3.5e38",  # finite in float64, inf in float32
    "1e39 5:1",  # a label that overflows
    "1 5:" + "1" * 40,  # a 40-digit literal: TensorFlow's string-to-number refuses 32+ characters
    "1 5:0." + "0" * 36 + "1",  # 40 characters and finite: refused for its length alone
    "1 " + "9" * 19 + ":1",  # a key beyond int64
    "1 5:1\r6:2",  # a lone carriage return inside a line
    "1 5:1\x002",  # a NUL byte
    "1 5:nan",
]


@pytest.mark.parametrize("parser", ["op", "tf.strings"])
def test_hostile_lines_are_bad_lines_on_both_paths_across_mixed_gzip_and_plain_files(tmp_path, examples, parser):
    """A glob over one plain and one gzip file, hostile lines in the held-out part and in the
    training part: the memory reader and the traced pipeline agree example for example."""
    import gzip

    import tensorflow as tf

    from sparsebench.plan.cell import Cell
    from sparsebench.plan.spec import MeasureSpec, ModelSpec
    from sparsebench.train.inputs.datafiles import read
    from sparsebench.train.inputs.open import open_input

    WRITERS["libsvm"](examples.slice(0, 150), tmp_path / "a.libsvm")
    WRITERS["libsvm"](examples.slice(150, 300), tmp_path / "b.libsvm.gz", compress=True)
    plain = (tmp_path / "a.libsvm").read_text().split("\n")
    plain[10:10] = HOSTILE_LIBSVM  # inside the held-out part
    (tmp_path / "a.libsvm").write_text("\n".join(plain))
    zipped = gzip.open(tmp_path / "b.libsvm.gz", "rt").read().split("\n")
    zipped[20:20] = HOSTILE_LIBSVM + ["1 5:3.4e38"]  # in the training part; the last one is finite: kept
    with gzip.open(tmp_path / "b.libsvm.gz", "wt", newline="") as fh:
        fh.write("\n".join(zipped))
    source = str(tmp_path / "*.libsvm*")
    batch, report = read(source, "libsvm", 12)
    assert report.bad == 2 * len(HOSTILE_LIBSVM) and batch.batch_size == 301
    assert np.all(np.isfinite(batch.values)) and np.isclose(batch.values, 3.4e38, rtol=1e-6).sum() == 1
    assert "not finite in float32" in report.first_bad[0] and "40 characters" in report.first_bad[3]
    spec = DataSpec(feature_bits=12, source=source, format="libsvm", input="pipeline", max_bad_fraction=0.1,
                    text_parser=parser)
    measure = MeasureSpec(batch_pool=4, eval_examples=50)
    memory = open_input(Cell("t", 64, ModelSpec(), replace(spec, input="memory"), measure=measure))
    piped = open_input(Cell("t", 64, ModelSpec(), spec, measure=measure), text_parser(parser))
    same(piped.held_out, memory.held_out)
    assert piped.facts["read"]["bad"] == 2 * len(HOSTILE_LIBSVM) and len(memory.pool) == 3
    iterator = iter(piped.dataset())
    for expected in memory.pool:
        sp, labels = next(iterator)
        assert isinstance(sp, tf.SparseTensor)
        np.testing.assert_array_equal(sp.indices.numpy(), expected.coo_indices())
        np.testing.assert_array_equal(sp.values.numpy(), expected.values)
        np.testing.assert_array_equal(labels.numpy(), expected.labels)


def test_a_non_finite_tfrecord_value_is_a_bad_record_on_both_paths(tmp_path, examples):
    from sparsebench.train.inputs.pipeline import dataset

    bad = replace(examples, values=examples.values.copy())
    bad.values[bad.row_splits[3]] = np.inf  # example 3
    WRITERS["tfrecord"](bad, tmp_path / "x.tfrecord")
    batch, report = read(str(tmp_path / "x.tfrecord"), "tfrecord", 12)
    assert report.bad == 1 and batch.batch_size == 299 and "not finite" in report.first_bad[0]
    spec = DataSpec(feature_bits=12, source=str(tmp_path / "x.tfrecord"), format="tfrecord", input="pipeline")
    sp, labels = next(iter(dataset(spec, 299, 0)))
    np.testing.assert_array_equal(sp.values.numpy(), batch.values)


def test_a_write_that_fails_midway_leaves_no_file_and_an_existing_file_needs_force(tmp_path, monkeypatch, capsys):
    """`data write` wrote straight into PATH: a full disk left half a file there, and an
    existing file was replaced without --force (which `convert` asks for)."""
    import errno

    from sparsebench.train.inputs import datatool

    def full_disk(batch, path, compress=False):
        Path(path).write_text("1 3:1\n")  # the first line fits, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    target = tmp_path / "x.libsvm"
    argv = ["write", str(target), "--format", "libsvm", "--examples", "5"]
    monkeypatch.setitem(datatool.WRITERS, "libsvm", full_disk)
    assert datatool.main(argv) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither PATH nor the partial file behind it
    monkeypatch.undo()
    target.write_text("precious\n")
    assert datatool.main(argv) == 2
    assert f"{target}: exists (--force to replace it)" in capsys.readouterr().err
    assert target.read_text() == "precious\n"
    assert datatool.main([*argv, "--force"]) == 0
    assert len(target.read_text().splitlines()) == 5 and list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("blank_at", [255, 0, 100])
def test_a_check_chunk_ending_in_a_blank_line_is_checked_not_crashed(tmp_path, blank_at):
    """The tf.strings check scattered each line's first token by its row start; a chunk
    ending with an empty line put that start past the last token (ScatterNd out of range:
    a file ending "\\n\\n" crashed its pipeline cell). Traced, as the pipeline maps it."""
    import tensorflow as tf

    from sparsebench.train.inputs.pipeline import VALIDATE_CHUNK, _libsvm_ok

    lines = [f"{i % 2} {i}:1 {i + 1}:0.5" for i in range(VALIDATE_CHUNK + 10)]
    lines[blank_at] = ""
    path = tmp_path / "x.libsvm"
    path.write_text("\n".join(lines) + "\n\n")  # and the file ends with a blank line
    checked = tf.data.TextLineDataset(str(path)).batch(VALIDATE_CHUNK).map(_libsvm_ok)
    ok = np.concatenate([chunk.numpy() for chunk in checked])
    assert len(ok) == len(lines) + 1
    assert ok.sum() == len(lines) - 1 and not ok[blank_at] and not ok[-1]


@pytest.fixture
def cut_gzip(tmp_path, examples):
    """A libsvm.gz file cut 40 bytes before its end (a copy that stopped early)."""
    whole = tmp_path / "whole.libsvm.gz"
    WRITERS["libsvm"](examples, whole, compress=True)
    cut = tmp_path / "cut.libsvm.gz"
    cut.write_bytes(whole.read_bytes()[:-40])
    return whole, cut


def test_a_cut_gzip_source_is_one_error_naming_it_on_every_reader(cut_gzip):
    """A truncated .gz printed an EOFError traceback (inspect, convert), failed a memory cell
    without naming the file, and let a pipeline cell train on its readable part."""
    from sparsebench.train.inputs.datafiles import DataFileError, convert_to_blocks
    from sparsebench.train.inputs.paths import check_gzip_complete

    whole, cut = cut_gzip
    check_gzip_complete(whole)
    for attempt in (lambda: check_gzip_complete(cut), lambda: read(str(cut), "libsvm", 12)):
        with pytest.raises(DataFileError, match=f"{cut}: the gzip stream"):
            attempt()


def test_a_cut_gzip_source_fails_the_op_parsers_source_check(cut_gzip):
    """The C++ parser's source check reads through TensorFlow, which stops at the cut."""
    from sparsebench.train.inputs.datafiles import DataFileError
    from sparsebench.train.inputs.pipeline import count_text

    whole, cut = cut_gzip
    parse_text = text_parser("op")
    spec = DataSpec(feature_bits=12, source=str(whole), format="libsvm", input="pipeline", text_parser="op")
    assert count_text(spec, parse_text).examples == 300
    with pytest.raises(DataFileError, match=f"{cut}: the gzip stream ends early"):
        count_text(replace(spec, source=str(cut)), parse_text)


# Item 4 of issue 36: lines where the readers disagreed. Whitespace is RE2's \s on every path
# (not Python's str.strip()), every "\r" is dropped as TensorFlow's line reader drops it, and
# a label is compared in float32.
ODD_LINES = {
    "\v": "malformed", "\u00a0": "malformed", "\x1c": "malformed", "\u0085": "malformed",
    " \v# not a comment: \\v is no whitespace": "malformed", "1 3:1\r5:2": "malformed",
    "\f": "skipped", "  \f # a comment after a form feed": "skipped",
    "1 3:1 7:2\r\r": "example", "1e-46 3:1 5:2": "example",
}


@pytest.mark.parametrize("parser", ["op", "tf.strings"])
def test_every_reader_agrees_on_the_odd_lines(tmp_path, examples, parser):
    """One file holding every line the readers disagreed on, inside the training part: the
    memory path, the pipeline (C++ parser or tf.strings), inspect's and convert's reader count
    the same malformed lines and yield the same examples with the same labels."""
    from sparsebench.plan.cell import Cell
    from sparsebench.plan.spec import MeasureSpec, ModelSpec
    from sparsebench.train.inputs.blocks import read_header
    from sparsebench.train.inputs.datafiles import TFRecordNames, convert_to_blocks
    from sparsebench.train.inputs.open import open_input

    path = tmp_path / "odd.libsvm"
    WRITERS["libsvm"](examples, path)
    lines = path.read_text().splitlines()
    lines[60:60] = list(ODD_LINES)  # after the 50 held out, inside the first training batch
    path.write_bytes(("\n".join(lines) + "\n").encode())
    malformed = sum(kind == "malformed" for kind in ODD_LINES.values())
    spec = DataSpec(feature_bits=12, source=str(path), format="libsvm", input="pipeline", max_bad_fraction=0.5,
                    text_parser=parser)
    measure = MeasureSpec(batch_pool=2, eval_examples=50)
    memory = open_input(Cell("t", 64, ModelSpec(), replace(spec, input="memory"), measure=measure))
    piped = open_input(Cell("t", 64, ModelSpec(), spec, measure=measure), text_parser(parser))
    assert memory.facts["read"]["bad"] == piped.facts["read"]["bad"] == malformed
    assert piped.facts["read"]["examples"] == 300 + 2
    odd_labels = memory.pool[0].labels[10:12]
    assert odd_labels.tolist() == [1.0, 0.0]  # "1 3:1 7:2\r\r" and the label 1e-46, which is 0 in float32
    iterator = iter(piped.dataset())
    for expected in memory.pool:
        sp, labels = next(iterator)
        np.testing.assert_array_equal(sp.indices.numpy(), expected.coo_indices())
        np.testing.assert_array_equal(sp.values.numpy(), expected.values)
        np.testing.assert_array_equal(labels.numpy(), expected.labels)
    inspected, report = read(str(path), "libsvm", 12)  # `data inspect`'s reader
    assert report.bad == malformed and inspected.batch_size == 302
    header = convert_to_blocks(str(path), "libsvm", tmp_path / "odd.blocks", 12, TFRecordNames())
    assert header.malformed == malformed and header.examples == 302
    assert read_header(tmp_path / "odd.blocks").first_malformed[0].startswith(f"{path}:61:")
