"""The blocks format and batch-first TFRecord: the same examples as every other reader
(written directly, converted from each text format plain or gzip, held-out ones skipped,
across passes over the file), bad lines counted at convert time, a truncated file one clear
error naming its block, memory flat while streaming."""

import gzip
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
from sparsebench.train.inputs.datafiles import WRITERS, DataFileError, TFRecordNames, read

ROOT = Path(__file__).resolve().parent.parent


def same(a, b):
    assert a.batch_size == b.batch_size
    np.testing.assert_array_equal(a.row_splits, b.row_splits)
    np.testing.assert_array_equal(a.keys, b.keys)
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.labels, b.labels)


@pytest.fixture(scope="module")
def examples():
    return SyntheticData(DataSpec(feature_bits=12, mean_active=20)).sample(300, stream=0)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("block_examples", [1, 37, 256, 1000])
def test_blocks_written_read_back_the_examples(tmp_path, examples, compress, block_examples):
    from sparsebench.train.inputs.blocks import read_header, write_blocks

    path = tmp_path / "x.blocks"
    write_blocks(examples, path, compress, feature_bits=12, block_examples=block_examples)
    header = read_header(path)
    assert header.examples == 300 and header.blocks == -(-300 // block_examples) and header.key_dtype == "int32"
    batch, report = read(str(path), "blocks", 12)
    assert report.bad == 0 and report.examples == 300
    same(batch, examples)
    part, _ = read(str(path), "blocks", 12, limit=50, skip=123)
    same(part, examples.slice(123, 173))
    for bits in (11, 13):  # fewer bits would collide keys within an example, more are not in the file
        with pytest.raises(DataFileError, match=f"written with feature_bits 12, read with {bits}: convert"):
            read(str(path), "blocks", bits)


HOSTILE = ["# a comment", "", "1 5:1e999 6:1", "1 5:" + "1" * 40, "1 5:nan", "1 3:x"]


@pytest.mark.parametrize("fmt", ["libsvm", "criteo", "tfrecord"])
def test_convert_keeps_every_good_example_and_counts_the_bad_ones_in_the_header(tmp_path, examples, fmt):
    """Converted from gzip with CRLF (text) or from records: the blocks file reads back
    exactly what the source's own reader gives, and names what it left out."""
    from sparsebench.train.inputs.datafiles import convert_to_blocks as convert

    source = tmp_path / f"x.{fmt}.gz"
    WRITERS[fmt](examples, source, compress=True)
    bad = 0
    if fmt != "tfrecord":
        lines = gzip.open(source, "rt").read().splitlines()
        extra = HOSTILE if fmt == "libsvm" else ["", "1\t2\tzz", "1" + "\t" * 39 + "zz"]
        lines[7:7] = extra
        bad = 4 if fmt == "libsvm" else 2
        with gzip.open(source, "wt", newline="") as fh:
            fh.write("\r\n".join(lines) + "\r\n")
    bits = 24 if fmt == "criteo" else 12
    expected, report = read(str(source), fmt, bits)
    assert report.bad == bad
    header = convert(str(source), fmt, tmp_path / "x.blocks", bits, TFRecordNames(), block_examples=64)
    assert header.malformed == bad and len(header.first_malformed) == bad
    assert header.source["format"] == fmt and len(header.source["sha256"]) == 64
    assert header.source["bytes"] == source.stat().st_size
    converted, again = read(str(tmp_path / "x.blocks"), "blocks", bits)
    same(converted, expected)
    assert again.bad == 0 and again.converted["malformed"] == bad
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("*.blocks-body"))


def test_a_truncated_or_foreign_blocks_file_is_one_error_naming_the_block(tmp_path, examples):
    from sparsebench.train.inputs.blocks import write_blocks

    path = tmp_path / "x.blocks"
    write_blocks(examples, path, feature_bits=12, block_examples=50)  # 6 blocks
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) - 2000])  # inside the last block
    with pytest.raises(DataFileError, match=r"x.blocks: block 6 is truncated or corrupt"):
        read(str(path), "blocks", 12)
    with pytest.raises(DataFileError, match=r"x.blocks: block 6 is truncated or corrupt"):
        read(str(path), "blocks", 12, keep=False)  # the pipeline's check before timing reads every block
    WRITERS["tfrecord"](examples, tmp_path / "y.tfrecord")
    with pytest.raises(DataFileError, match="not a sparsebench blocks file"):
        read(str(tmp_path / "y.tfrecord"), "blocks", 12)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([sys.executable, "-m", "sparsebench", "data", "inspect", str(path), "--format", "blocks",
                           "--feature-bits", "12"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "block 6 is truncated or corrupt" in done.stderr.splitlines()[-1]


def _expected_stream(training, batch_size: int, batches: int):
    """What a pipeline must yield: the training examples in order, pass after pass, cut into
    consecutive batches (a batch may span the end of one pass and the start of the next)."""
    from sparsebench.train.inputs.datafiles import _concat

    passes = _concat([training] * (batches * batch_size // training.batch_size + 2))
    return [passes.slice(i * batch_size, (i + 1) * batch_size) for i in range(batches)]


@pytest.mark.parametrize("fmt,block_examples", [("blocks", 16), ("blocks", 37), ("blocks", 100), ("tfrecord", None)])
def test_the_pipeline_streams_the_training_examples_pass_after_pass(tmp_path, examples, fmt, block_examples):
    """The traced tf.data graph the timed loop pulls from: blocks into batches of 64 (four
    blocks of 16 decoded as one group; blocks of 37 carried over; blocks of 100 cut into
    more than one batch), the 50 held-out examples skipped on every pass, batches spanning
    two passes; TFRecord parsed a batch at a time (its source was checked clean) gives the
    same."""
    from sparsebench.plan.cell import Cell
    from sparsebench.plan.spec import MeasureSpec, ModelSpec
    from sparsebench.train.inputs.blocks import write_blocks
    from sparsebench.train.inputs.open import open_input

    path = tmp_path / f"x.{fmt}"
    if fmt == "blocks":
        write_blocks(examples, path, feature_bits=12, block_examples=block_examples)
    else:
        WRITERS[fmt](examples, path)
    spec = DataSpec(feature_bits=12, source=str(path), format=fmt, input="pipeline")
    measure = MeasureSpec(batch_pool=3, eval_examples=50)
    memory = open_input(Cell("t", 64, ModelSpec(), replace(spec, input="memory"), measure=measure))
    piped = open_input(Cell("t", 64, ModelSpec(), spec, measure=measure))
    same(piped.held_out, examples.slice(0, 50))
    assert piped.facts["parsing"] == "per batch"
    assert piped.facts["tf_data"]["private_threadpool_size"] >= 1
    expected = _expected_stream(examples.slice(50, 300), 64, 12)  # 250 per pass: batches 4, 8 and 12 span two
    for pooled, want in zip(memory.pool, expected):
        same(pooled, want)
    iterator = iter(piped.dataset())
    for want in expected:
        sp, labels = next(iterator)
        np.testing.assert_array_equal(sp.indices.numpy(), want.coo_indices())
        np.testing.assert_array_equal(sp.values.numpy(), want.values)
        np.testing.assert_array_equal(labels.numpy(), want.labels)


def test_a_tfrecord_source_with_a_bad_record_is_parsed_example_by_example(tmp_path, examples):
    from sparsebench.plan.cell import Cell
    from sparsebench.plan.spec import MeasureSpec, ModelSpec
    from sparsebench.train.inputs.open import open_input

    bad = replace(examples, values=examples.values.copy())
    bad.values[bad.row_splits[100]] = np.nan
    WRITERS["tfrecord"](bad, tmp_path / "x.tfrecord")
    spec = DataSpec(feature_bits=12, source=str(tmp_path / "x.tfrecord"), format="tfrecord", input="pipeline",
                    max_bad_fraction=0.01)
    piped = open_input(Cell("t", 64, ModelSpec(), spec, measure=MeasureSpec(batch_pool=3, eval_examples=50)))
    assert piped.facts["parsing"] == "per example" and piped.facts["read"]["bad"] == 1
    kept = read(str(tmp_path / "x.tfrecord"), "tfrecord", 12, skip=50)[0]
    iterator = iter(piped.dataset())
    for want in _expected_stream(kept, 64, 4):
        sp, _ = next(iterator)
        np.testing.assert_array_equal(sp.values.numpy(), want.values)


def test_streaming_a_blocks_file_keeps_memory_flat(tmp_path):
    """A file several times what a pool would hold, streamed three times: resident memory
    grows by well under the file's size a pass (nothing accumulates)."""
    import psutil

    from sparsebench.train.inputs.blocks import write_blocks
    from sparsebench.train.inputs.pipeline import dataset

    batch = SyntheticData(DataSpec(feature_bits=16, mean_active=60)).sample(100_000, stream=0)
    write_blocks(batch, tmp_path / "x.blocks", feature_bits=16)
    file_mb = (tmp_path / "x.blocks").stat().st_size / 2**20
    del batch
    spec = DataSpec(feature_bits=16, source=str(tmp_path / "x.blocks"), format="blocks", input="pipeline")
    iterator = iter(dataset(spec, 256, 0))
    per_pass = 100_000 // 256

    def resident_mb() -> float:
        """Resident memory of what is alive: freed heap that glibc keeps mapped is handed
        back first (on some hosts that alone grew ~5 MB a pass), so only memory something
        still holds is counted."""
        import ctypes
        import gc

        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc: RSS as it is
        return psutil.Process().memory_info().rss / 2**20

    for _ in range(50):  # an eighth of a pass: what the pipeline's threads and buffers grow to, not the file
        next(iterator)
    rss = [resident_mb()]
    for _ in range(3):
        for _ in range(per_pass):
            next(iterator)
        rss.append(resident_mb())
    print(f"file {file_mb:.1f} MB, RSS after each pass {rss}")
    assert file_mb > 15
    # Three passes: a pipeline that kept what it read would have grown by three times the file; on
    # some hosts the allocator's arenas grow by up to a fifth of it a pass before they settle.
    assert max(rss) - rss[0] < file_mb, (rss, file_mb)


def test_data_write_blocks_and_inspect_show_the_header(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    path = tmp_path / "x.blocks"
    done = subprocess.run([sys.executable, "-m", "sparsebench", "data", "write", str(path), "--format", "blocks",
                           "--examples", "500", "--feature-bits", "12"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "-m", "sparsebench", "data", "inspect", str(path), "--format", "blocks",
                           "--feature-bits", "12", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout)
    assert facts["examples"] == 500 and facts["blocks_header"][0]["blocks"] == 2
    assert facts["blocks_header"][0]["feature_bits"] == 12 and facts["blocks_header"][0]["source"] is None


def test_convert_never_writes_onto_its_source_and_expands_its_glob_once(tmp_path, examples):
    """`data convert SRC SRC --force` replaced the source with its own conversion (data
    lost), a DST the SRC glob matches would too, and the glob, expanded again after the
    temporary `DST.blocks-body` was created, read that file as source (issue 36)."""
    from sparsebench.train.inputs.datafiles import convert_to_blocks

    folder = tmp_path / "parts"
    folder.mkdir()
    for i in range(2):
        WRITERS["libsvm"](examples.slice(i * 150, (i + 1) * 150), folder / f"part{i}.svm")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([sys.executable, "-m", "sparsebench", "data", "convert", str(folder / "part0.svm"),
                           str(folder / "part0.svm"), "--format", "libsvm", "--feature-bits", "12", "--force"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "is the source" in done.stderr.strip().splitlines()[-1]
    os.symlink(folder / "part0.svm", tmp_path / "link.svm")
    for src, dst in [(folder / "*", folder / "part1.svm"), (folder / "part0.svm", tmp_path / "link.svm")]:
        with pytest.raises(DataFileError, match="is the source"):
            convert_to_blocks(str(src), "libsvm", dst, 12, TFRecordNames())
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    # zz: its temporary DST.blocks-body sorts after the sources, as they are read into it
    convert_to_blocks(str(folder / "*"), "libsvm", folder / "zz.blocks", 12, TFRecordNames())
    batch, report = read(str(folder / "zz.blocks"), "blocks", 12)
    assert report.converted["malformed"] == 0
    same(batch, examples)


def _hand_made(path: Path, header: dict, blocks: list[bytes]) -> Path:
    """A blocks file written record by record: a header (what `data write` would say,
    changed by `header`) and the given blocks."""
    import tensorflow as tf

    from sparsebench.train.inputs.blocks import MAGIC

    facts = {"feature_bits": 12, "key_dtype": "int32", "block_examples": 4, "blocks": len(blocks), "examples": 0,
             "entries": 0, "source": None, "malformed": 0, "first_malformed": [], "version": 1, **header}
    with tf.io.TFRecordWriter(str(path)) as writer:
        writer.write(MAGIC + json.dumps(facts).encode())
        for block in blocks:
            writer.write(block)
    return path


def _block(lengths, labels, keys, values) -> bytes:
    return (np.array([len(lengths), len(keys)], "<i4").tobytes() + np.array(lengths, "<i4").tobytes()
            + np.array(labels, "<f4").tobytes() + np.array(keys, "<i4").tobytes() + np.array(values, "<f4").tobytes())


GOOD_BLOCK = dict(lengths=[2, 1], labels=[1, 0], keys=[3, 9, 4], values=[1.0, 0.5, 2.0])


@pytest.mark.parametrize("header, block, says", [
    ({}, {**GOOD_BLOCK, "keys": [-1, 9, 4]}, r"block 1: key -1 is outside \[0, 2\*\*12\)"),
    ({}, {**GOOD_BLOCK, "keys": [3, 4096, 4]}, r"block 1: key 4096 is outside \[0, 2\*\*12\)"),
    ({}, {**GOOD_BLOCK, "values": [1.0, float("nan"), 2.0]}, r"block 1: a value is nan \(not finite\)"),
    ({}, {**GOOD_BLOCK, "labels": [float("inf"), 0]}, r"block 1: a label is inf \(not finite\)"),
    ({}, {**GOOD_BLOCK, "lengths": [-1, 4]}, r"block 1: example 0 has row length -1, below 0"),
    ({"block_examples": 1}, GOOD_BLOCK, r"block 1: 2 examples, more than the header's block_examples 1"),
    ({"examples": 2, "entries": 3, "blocks": 2}, GOOD_BLOCK, r"the header says 2 blocks, 2 examples, 3 entries; "
                                                             r"the file holds 1, 2, 3 \(cut at a block boundary"),
    ({"block_examples": 0}, GOOD_BLOCK, r"header block_examples is 0, expected an integer, 1 or more"),
    ({"feature_bits": "12"}, GOOD_BLOCK, r"header feature_bits is \"12\", expected an integer, 1 to 63"),
    ({"source": {"path": "x", "format": "libsvm", "bytes": 5}}, GOOD_BLOCK, r"header source must be null or hold"),
])
def test_a_blocks_file_is_checked_as_text_lines_are_naming_the_block(tmp_path, header, block, says):
    """Blocks were trusted: out-of-range keys failed cells late in TensorFlow's words, NaN
    trained, a file cut at a block boundary read silently, header fields went unchecked
    (block_examples 0: ZeroDivisionError; a source without sha256: inspect's traceback)."""
    counts = {"examples": len(block["labels"]), "entries": len(block["keys"])}
    path = _hand_made(tmp_path / "x.blocks", {**counts, **header}, [_block(**block)])
    with pytest.raises(DataFileError, match=says):
        read(str(path), "blocks", 12, keep=False)


def test_a_hand_made_blocks_file_that_is_right_reads(tmp_path):
    """The checks above refuse only what is wrong: the same hand-made file, right, reads."""
    path = _hand_made(tmp_path / "x.blocks", {"examples": 2, "entries": 3}, [_block(**GOOD_BLOCK)])
    batch, _ = read(str(path), "blocks", 12)
    assert batch.keys.tolist() == [3, 9, 4] and batch.labels.tolist() == [1, 0]
