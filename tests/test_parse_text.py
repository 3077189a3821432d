"""The C++ text parser (`parse_text.cc`) against the Python readers, line by line: the same
lines are examples, skipped or bad, and the examples have bit-identical keys, values and
labels; the op run inside a traced tf.data map, as the pipeline runs it."""

import numpy as np
import pytest
from conftest import require_custom_op

from sparsebench.train.inputs.datafiles import read

LIBSVM_LINES = [
    "1 3:1 17:0.5 99:2",
    "0 4:1 18:3",
    "1",  # a label and no features: an example with none
    "-1 5:5. 6:.5 7:+2 8:-0",  # "5." and ".5", signs
    "1 +9:1 -3:1",  # signed keys: two's complement, masked
    "1 5:-1e-400 6:1e-50 7:3.4e38",  # below float32 (a signed zero), the largest finite
    "1\t5:1\t\t6:2 \t",  # tabs between pairs and at the end
    "1 5:1\r",  # CRLF
    "   ",  # blank: skipped
    "  # a comment 5:1",  # skipped
    "",  # skipped
    "1 5:1e39",  # inf in float32: bad
    "1 5:0." + "0" * 36 + "1",  # 40 characters: bad
    "1 " + "9" * 19 + ":1",  # a key of 19 digits: bad
    "1 5:1 # trailing comment",  # bad (comments are whole lines)
    "1 5:1e",  # an exponent without digits: bad
    "1 5:",  # bad
    "1 5:nan",  # bad
    "1 5:1,6:2",  # bad
    "1 5 :1",  # bad
    "x 5:1",  # bad
    "1 5:1\x002",  # a NUL byte: bad
]

CRITEO_LINES = [
    "1\t" + "\t".join(["3", "", "-7", "+2"] + [""] * 9) + "\t" + "\t".join(["a0", "", "FFFFFFFFFFFFFFFF"] + [""] * 23),
    "0\t" + "\t".join([""] * 13) + "\t" + "\t".join([""] * 26),  # an example with no features
    "+5\t" + "\t".join(["1" * 30] + [""] * 12) + "\t" + "\t".join(["00ff"] * 26) + "\r",  # 30 digits, CRLF
    "",  # blank: skipped (not bad)
    "1\t" + "\t".join(["+"] + [""] * 12) + "\t" + "\t".join([""] * 26),  # a sign alone: bad (Python's int fails)
    "1\t" + "\t".join([""] * 13) + "\t" + "\t".join(["1" * 17] + [""] * 25),  # 17 hex digits: bad
    "1\t" + "\t".join([""] * 13) + "\t" + "\t".join(["zz"] + [""] * 25),  # not hex: bad
    "1\t" + "\t".join([""] * 12),  # too few fields: bad
    "1\t" + "\t".join([""] * 13) + "\t" + "\t".join([""] * 27),  # too many: bad
]


@pytest.fixture(scope="module")
def parse_text():
    require_custom_op()
    from sparsebench.train.custom_ops.ops import parse_text

    return parse_text


@pytest.mark.parametrize("fmt,lines,bits", [("libsvm", LIBSVM_LINES, 12), ("criteo", CRITEO_LINES, 24)])
def test_each_line_is_what_the_python_reader_says_it_is(tmp_path, parse_text, fmt, lines, bits):
    import tensorflow as tf

    kinds = parse_text(tf.constant(lines), fmt, bits)[4].numpy()
    for line, kind in zip(lines, kinds):
        path = tmp_path / "one.txt"
        path.write_bytes(line.encode() + b"\n")
        batch, report = read(str(path), fmt, bits)
        expected = 2 if report.bad else 0 if report.examples else 1
        assert kind == expected, (line, kind, report.first_bad)
    # The examples, all lines at once, in the traced map the pipeline runs.
    path = tmp_path / "all.txt"
    path.write_bytes("\n".join(lines).encode() + b"\n")
    batch, report = read(str(path), fmt, bits)
    parsed = tf.data.Dataset.from_tensors(tf.constant(lines)).map(lambda x: parse_text(x, fmt, bits))
    lengths, labels, keys, values, line_kinds = next(iter(parsed))
    assert int((line_kinds.numpy() == 2).sum()) == report.bad
    np.testing.assert_array_equal(np.concatenate([[0], np.cumsum(lengths.numpy())]), batch.row_splits)
    np.testing.assert_array_equal(keys.numpy(), batch.keys)
    np.testing.assert_array_equal(values.numpy().view(np.uint32), batch.values.view(np.uint32))  # bits: -0.0 too
    np.testing.assert_array_equal(labels.numpy(), batch.labels)


def test_bad_attributes_and_shapes_are_errors_not_crashes(parse_text):
    import tensorflow as tf

    with pytest.raises(tf.errors.InvalidArgumentError, match="format must be libsvm or criteo"):
        parse_text(tf.constant(["1 2:3"]), "csv", 12)
    with pytest.raises(tf.errors.InvalidArgumentError, match="feature_bits must be in"):
        parse_text(tf.constant(["1 2:3"]), "libsvm", 0)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="must be a vector|rank 1|Shape must be"):
        parse_text(tf.constant([["1 2:3"]]), "libsvm", 12)
    assert parse_text(tf.constant([], tf.string), "libsvm", 12)[4].shape == (0,)


@pytest.mark.parametrize("fmt,lines,bits", [("libsvm", LIBSVM_LINES, 12), ("criteo", CRITEO_LINES, 24)])
def test_the_source_check_through_the_op_counts_what_the_python_reader_counts(tmp_path, monkeypatch, parse_text,
                                                                             fmt, lines, bits):
    """A pipeline cell's source check (`pipeline.count_text`) over two files, one gzip, with
    bad lines on both sides of a chunk boundary: the same examples, bad lines and first-bad
    names (file, line number, reason) as the Python reader."""
    import gzip

    from sparsebench.plan.spec import DataSpec
    from sparsebench.train.inputs import pipeline

    monkeypatch.setattr(pipeline, "COUNT_CHUNK", 7)  # lines per op call: chunk boundaries inside each file
    body = "\n".join(lines * 3) + "\n"
    (tmp_path / "a.txt").write_text(body)
    with gzip.open(tmp_path / "b.txt", "wt") as fh:
        fh.write(body)
    source = str(tmp_path / "*.txt")
    _, expected = read(source, fmt, bits, keep=False)
    spec = DataSpec(source=source, format=fmt, feature_bits=bits, input="pipeline")
    counted = pipeline.count_text(spec, parse_text)
    assert expected.bad > 0 and expected.examples > 0
    assert (counted.examples, counted.bad) == (expected.examples, expected.bad)
    assert counted.first_bad == expected.first_bad
