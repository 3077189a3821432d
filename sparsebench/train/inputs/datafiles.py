"""Examples from files: libsvm, Criteo TSV and TFRecord, plain or gzip, into `SparseBatch`es.

Keys land in `[0, 2**feature_bits)`:
- libsvm / svmlight (`label key:value ...`): the key modulo `2**feature_bits` (so data
  written by `sparsebench data write` reads back unchanged); a label > 0 is 1, else 0;
- Criteo TSV (label, 13 integer columns, 26 hex categorical columns, tab-separated, empty
  fields allowed): integer column i (0-12) is one key, `hash(i)`, whose value is the
  integer, so the normalization and the discretizer see the raw counts; categorical
  column j with hex value h is the key `hash(13 + j, h)` with value 1. The hash is
  splitmix64 of `column * 2**32 + h`, masked to `feature_bits`;
- TFRecord of `tf.train.Example`: int64 ids, float values and one float label under
  configurable feature names; ids modulo `2**feature_bits`.
Within an example, keys are sorted and a repeated key keeps its last value.

A malformed line or record is counted, and the first few are kept as `file:line: why`;
the caller decides whether the bad fraction is acceptable (`max_bad_fraction`).
"""

from __future__ import annotations

import gzip
import zlib
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ...plan.spec import DATA_FORMATS
from .blocks import BLOCK_EXAMPLES, Header
from .data import SparseBatch
from .paths import DataFileError, is_gzip, source_files  # noqa: F401 - re-exported: the readers' errors

FORMATS = DATA_FORMATS
CRITEO_INT_COLUMNS, CRITEO_CAT_COLUMNS = 13, 26
FIRST_BAD_KEPT = 5


@dataclass
class ReadReport:
    """What reading found: examples kept, malformed ones skipped, where the first were."""

    examples: int = 0
    bad: int = 0
    first_bad: list[str] = field(default_factory=list)
    converted: dict | None = None  # a blocks file: what its header says of its conversion

    @property
    def bad_fraction(self) -> float:
        total = self.examples + self.bad
        return self.bad / total if total else 0.0

    def skip(self, where: str, why: str) -> None:
        self.bad += 1
        if len(self.first_bad) < FIRST_BAD_KEPT:
            self.first_bad.append(f"{where}: {why}")

    def to_dict(self) -> dict:
        facts = {"examples": self.examples, "bad": self.bad, "bad_fraction": self.bad_fraction,
                 "first_bad": self.first_bad}
        if self.converted is not None:
            facts["converted"] = self.converted
        return facts


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of a text file, plain or gzip, as tf.data's TextLineDataset gives
    the pipeline its lines: split at "\n" only, and every "\r" dropped (a CRLF end, "\r\r\n",
    and a lone "\r" inside a line, which then joins its neighbours: "5:1\r6:2" is "5:16:2",
    malformed on every path)."""
    opener = gzip.open if is_gzip(path) else open
    number = 0
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace", newline="\n") as fh:
            for number, line in enumerate(fh, start=1):
                yield number, line.replace("\r", "")
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:  # a cut or corrupt gzip file: one line naming it
        raise DataFileError(f"{path}: the gzip stream is cut short or corrupt after line {number} ({exc}); copy "
                            f"it again or leave it out") from None


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def criteo_key(column: int, value: int, feature_bits: int) -> int:
    return _splitmix64((column << 32) + value) & ((1 << feature_bits) - 1)


class _Builder:
    """Collects examples into CSR arrays."""

    def __init__(self):
        self.splits, self.keys, self.values, self.labels = [0], [], [], []

    def add(self, label: float, features: dict[int, float]) -> None:
        for key in sorted(features):
            self.keys.append(key)
            self.values.append(features[key])
        self.splits.append(len(self.keys))
        self.labels.append(label)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self) -> SparseBatch:
        return SparseBatch(np.array(self.splits, np.int64), np.array(self.keys, np.int64),
                           np.array(self.values, np.float32), np.array(self.labels, np.float32))


class _Counter:
    """Counts examples without keeping them: a source checked before a pipeline streams it."""

    def __init__(self):
        self.count = 0

    def add(self, label: float, features: dict[int, float]) -> None:
        self.count += 1

    def __len__(self) -> int:
        return self.count

    def batch(self) -> None:
        return None


# What a well-formed line is, one definition for both paths: the Python readers reject what
# these rules reject, and the tf.data pipeline (pipeline.py) drops the same lines, so a line
# is counted malformed exactly where it is dropped.
# 1. The line patterns (RE2 and Python's re read them alike): plain numeric literals, keys of
#    at most KEY_DIGITS digits (so they fit TensorFlow's int64), Criteo's label likewise,
#    its counts of at most 30 digits, its categories of at most 16 hex digits (64 bits).
# 2. Every number literal of a libsvm line has at most MAX_LITERAL characters (TensorFlow's
#    string-to-number refuses longer ones) ...
# 3. ... and is finite in float32 (1e39 or 1e999 would be `inf`, and poison the table).
KEY_DIGITS = 18
MAX_LITERAL = 31
_NUMBER = r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
LIBSVM_LINE = rf"[ \t]*{_NUMBER}(?:[ \t]+[+-]?[0-9]{{1,{KEY_DIGITS}}}:{_NUMBER})*[ \t]*\r?"  # \r: CRLF files
CRITEO_LINE = (rf"[+-]?[0-9]{{1,{KEY_DIGITS}}}(?:\t[+-]?[0-9]{{0,30}}){{13}}(?:\t[0-9a-fA-F]{{0,16}}){{26}}\r?")
_LIBSVM, _CRITEO = re.compile(LIBSVM_LINE), re.compile(CRITEO_LINE)


def number(text: str) -> float:
    """A libsvm number literal as the pipeline reads it; ValueError when it is too long or
    not finite in float32 (rules 2 and 3 above)."""
    if len(text) > MAX_LITERAL:
        raise ValueError(f"number literal of {len(text)} characters ({text[:12]}...): at most {MAX_LITERAL}")
    with np.errstate(over="ignore", under="ignore"):
        value = np.float32(float(text))
    if not np.isfinite(value):
        raise ValueError(f"{text} is not finite in float32")
    return float(value)  # in float32, as the pipeline parses it: a label 1e-46 is 0, not above it


def _libsvm_example(line: str, mask: int) -> tuple[float, dict[int, float]]:
    if not _LIBSVM.fullmatch(line.rstrip("\n")):
        raise ValueError("not `label key:value ...` with plain numbers")
    parts = line.split()
    label = 1.0 if number(parts[0]) > 0 else 0.0
    features = {}
    for item in parts[1:]:
        key, sep, value = item.partition(":")
        if not sep:
            raise ValueError(f"{item!r} is not key:value")
        features[int(key) & mask] = number(value)
    return label, features


def _criteo_example(line: str, feature_bits: int) -> tuple[float, dict[int, float]]:
    fields = line.rstrip("\n").removesuffix("\r").split("\t")
    if not _CRITEO.fullmatch(line.rstrip("\n")):
        width = 1 + CRITEO_INT_COLUMNS + CRITEO_CAT_COLUMNS
        raise ValueError(f"{len(fields)} fields, expected {width}" if len(fields) != width else
                         f"not an integer label, 13 integers (up to 30 digits) and 26 hex values (up to 16 digits)")
    label = 1.0 if int(fields[0]) > 0 else 0.0
    features = {}
    for i, text in enumerate(fields[1:1 + CRITEO_INT_COLUMNS]):
        if text:
            features[criteo_key(i, 0, feature_bits)] = float(int(text))
    for j, text in enumerate(fields[1 + CRITEO_INT_COLUMNS:]):
        if text:
            features[criteo_key(CRITEO_INT_COLUMNS + j, int(text, 16), feature_bits)] = 1.0
    return label, features


# 4. A line of whitespace only, or (libsvm) whitespace then a comment, is neither an example
#    nor malformed. Whitespace is RE2's `\s`, [\t\n\f\r ], on every path (the C++ parser's
#    IsSpace too): not Python's str.strip(), which also strips \v, \x1c-\x1f, U+0085 and
#    U+00A0; a line of those is malformed everywhere.
SPACE = "[\t\n\f\r ]"
SKIPPED_LINE = {"libsvm": rf"{SPACE}*(?:#.*)?", "criteo": rf"{SPACE}*"}
_SKIPPED = {fmt: re.compile(pattern) for fmt, pattern in SKIPPED_LINE.items()}


def _skipped(line: str, fmt: str) -> bool:
    """A blank line, or a libsvm comment: neither an example nor malformed (rule 4)."""
    return _SKIPPED[fmt].fullmatch(line.rstrip("\n")) is not None


def _text_example(line: str, fmt: str, feature_bits: int) -> tuple[float, dict[int, float]]:
    """A libsvm or Criteo line's (label, features); ValueError or IndexError when malformed."""
    return _libsvm_example(line, (1 << feature_bits) - 1) if fmt == "libsvm" else _criteo_example(line, feature_bits)


def text_line_error(line: str, fmt: str, feature_bits: int) -> str | None:
    """Why a libsvm or Criteo line is malformed, or None when it is an example (or blank,
    or a libsvm comment)."""
    if _skipped(line, fmt):
        return None
    try:
        _text_example(line, fmt, feature_bits)
    except (ValueError, IndexError) as exc:
        return str(exc)
    return None


def _builder(keep: bool, sink):
    """Where read examples go: `sink` (a blocks file being written), a CSR builder, or a counter."""
    return sink if sink is not None else _Builder() if keep else _Counter()


def read_text(paths: list[Path], fmt: str, feature_bits: int, limit: int | None = None,
              skip: int = 0, keep: bool = True, sink=None) -> tuple[SparseBatch, ReadReport]:
    """libsvm or Criteo examples `skip`..`skip + limit` from `paths` in order (`keep=False`:
    only counted, in constant memory)."""
    builder, report, seen = _builder(keep, sink), ReadReport(), 0
    for path in paths:
        for number, line in _lines(path):
            if _skipped(line, fmt):
                continue
            try:
                label, features = _text_example(line, fmt, feature_bits)
            except (ValueError, IndexError) as exc:
                report.skip(f"{path}:{number}", str(exc))
                continue
            seen += 1
            if seen <= skip:
                continue
            builder.add(label, features)
            if limit is not None and len(builder) >= limit:
                report.examples = len(builder)
                return builder.batch(), report
    report.examples = len(builder)
    return builder.batch(), report


@dataclass(frozen=True)
class TFRecordNames:
    ids: str = "ids"
    values: str = "values"
    label: str = "label"


def read_tfrecord(paths: list[Path], feature_bits: int, names: TFRecordNames = TFRecordNames(),
                  limit: int | None = None, skip: int = 0, keep: bool = True,
                  sink=None) -> tuple[SparseBatch, ReadReport]:
    """`tf.train.Example` records; a record that does not parse or lacks the features is
    counted bad, a corrupt file (broken framing) ends that file with one bad entry."""
    import tensorflow as tf

    mask = (1 << feature_bits) - 1
    builder, report, seen = _builder(keep, sink), ReadReport(), 0
    for path in paths:
        records = iter(tf.data.TFRecordDataset(str(path), compression_type="GZIP" if is_gzip(path) else ""))
        number = 0
        while True:
            try:
                raw = next(records)
            except StopIteration:
                break
            except tf.errors.DataLossError as exc:
                report.skip(f"{path}:record {number + 1}", f"corrupt TFRecord framing ({exc.message.splitlines()[0]})")
                break
            number += 1
            try:
                example = tf.train.Example.FromString(raw.numpy())
                feature = example.features.feature
                ids = list(feature[names.ids].int64_list.value)
                values = list(feature[names.values].float_list.value)
                label_values = list(feature[names.label].float_list.value)
                if names.label not in feature or len(label_values) != 1:
                    raise ValueError(f"no single float {names.label!r}")
                if len(ids) != len(values):
                    raise ValueError(f"{len(ids)} {names.ids!r} but {len(values)} {names.values!r}")
                if not np.all(np.isfinite(values)) or not np.isfinite(label_values[0]):
                    raise ValueError("a value or the label is not finite")
            except Exception as exc:  # noqa: BLE001 - a bad record is counted, not fatal
                report.skip(f"{path}:record {number}", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                continue
            seen += 1
            if seen <= skip:
                continue
            builder.add(1.0 if label_values[0] > 0 else 0.0, {int(i) & mask: float(v) for i, v in zip(ids, values)})
            if limit is not None and len(builder) >= limit:
                report.examples = len(builder)
                return builder.batch(), report
    report.examples = len(builder)
    return builder.batch(), report


def read_blocks(paths: list[Path], feature_bits: int, limit: int | None = None, skip: int = 0,
                keep: bool = True, sink=None) -> tuple[SparseBatch, ReadReport]:
    """Examples of blocks files (`blocks.py`): whole blocks decoded, then sliced. Every block
    is decoded even when only counted, so a truncated or corrupt file fails here, before any
    timing, naming the block. Its malformed lines were dropped at convert time: the report
    carries the header's count as `converted`, not as bad examples of this read."""
    from . import blocks

    parts, report, seen, kept = [], ReadReport(), 0, 0
    for path in paths:
        header = blocks.read_header(path)
        report.converted = {"source": header.source, "malformed": header.malformed,
                            "first_malformed": header.first_malformed, "feature_bits": header.feature_bits}
        for block in blocks.iter_blocks(path, feature_bits):
            lo = min(max(skip - seen, 0), block.batch_size)
            seen += block.batch_size
            hi = block.batch_size if limit is None else min(block.batch_size, lo + limit - kept)
            if hi > lo:
                part = block.slice(lo, hi) if (lo, hi) != (0, block.batch_size) else block
                kept += part.batch_size
                if sink is not None:
                    sink.add_batch(part)
                elif keep:
                    parts.append(part)
            if limit is not None and kept >= limit:
                break
        if limit is not None and kept >= limit:
            break
    report.examples = kept
    return (_concat(parts) if keep and sink is None else None), report


def _concat(parts: list[SparseBatch]) -> SparseBatch:
    if not parts:
        return _Builder().batch()
    lengths = np.concatenate([np.diff(p.row_splits) for p in parts])
    splits = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=splits[1:])
    return SparseBatch(splits, np.concatenate([p.keys for p in parts]), np.concatenate([p.values for p in parts]),
                       np.concatenate([p.labels for p in parts]))


def read(pattern: str, fmt: str, feature_bits: int, limit: int | None = None, skip: int = 0,
         names: TFRecordNames = TFRecordNames(), keep: bool = True, sink=None) -> tuple[SparseBatch, ReadReport]:
    """Examples `skip`..`skip + limit` of the source's files; `keep=False` counts them only,
    `sink` (a `blocks.BlockSink`) takes them instead of memory."""
    return read_files(source_files(pattern), fmt, feature_bits, limit, skip, names, keep, sink)


def read_files(paths: list[Path], fmt: str, feature_bits: int, limit: int | None = None, skip: int = 0,
               names: TFRecordNames = TFRecordNames(), keep: bool = True, sink=None) -> tuple[SparseBatch, ReadReport]:
    """`read` of files already listed (a glob expanded once: `convert_to_blocks` must not
    see the temporary file it writes beside its destination)."""
    from .blocks import BlocksError

    if fmt not in FORMATS:
        raise DataFileError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "tfrecord":
        return read_tfrecord(paths, feature_bits, names, limit, skip, keep, sink)
    if fmt == "blocks":
        try:
            return read_blocks(paths, feature_bits, limit, skip, keep, sink)
        except BlocksError as exc:
            raise DataFileError(str(exc)) from None
    return read_text(paths, fmt, feature_bits, limit, skip, keep, sink)


# -- writing -----------------------------------------------------------------------------
def _open_write(path: Path, compress: bool):
    return gzip.open(path, "wt", encoding="utf-8") if compress else open(path, "w", encoding="utf-8")


def write_libsvm(batch: SparseBatch, path: Path, compress: bool = False) -> None:
    with _open_write(path, compress) as fh:
        for b in range(batch.batch_size):
            lo, hi = batch.row_splits[b], batch.row_splits[b + 1]
            pairs = " ".join(f"{k}:{v!r}" for k, v in zip(batch.keys[lo:hi].tolist(), batch.values[lo:hi].tolist()))
            fh.write(f"{int(batch.labels[b])} {pairs}\n")


def write_tfrecord(batch: SparseBatch, path: Path, compress: bool = False,
                   names: TFRecordNames = TFRecordNames()) -> None:
    import tensorflow as tf

    options = tf.io.TFRecordOptions(compression_type="GZIP" if compress else "")
    with tf.io.TFRecordWriter(str(path), options) as writer:
        for b in range(batch.batch_size):
            lo, hi = batch.row_splits[b], batch.row_splits[b + 1]
            example = tf.train.Example(features=tf.train.Features(feature={
                names.ids: tf.train.Feature(int64_list=tf.train.Int64List(value=batch.keys[lo:hi].tolist())),
                names.values: tf.train.Feature(float_list=tf.train.FloatList(value=batch.values[lo:hi].tolist())),
                names.label: tf.train.Feature(float_list=tf.train.FloatList(value=[float(batch.labels[b])])),
            }))
            writer.write(example.SerializeToString())


def write_criteo(batch: SparseBatch, path: Path, compress: bool = False) -> None:
    """Synthetic examples in Criteo's shape: the first 13 non-binary features' values,
    rounded, fill the integer columns; the first 26 binary features fill the categorical
    columns, as their key in hex. (Criteo's hashing maps them to other keys on reading.)"""
    with _open_write(path, compress) as fh:
        for b in range(batch.batch_size):
            lo, hi = batch.row_splits[b], batch.row_splits[b + 1]
            keys, values = batch.keys[lo:hi], batch.values[lo:hi]
            counts = [str(int(round(v))) for v in values[values != 1.0][:CRITEO_INT_COLUMNS]]
            cats = [f"{int(k):08x}" for k in keys[values == 1.0][:CRITEO_CAT_COLUMNS]]
            counts += [""] * (CRITEO_INT_COLUMNS - len(counts))
            cats += [""] * (CRITEO_CAT_COLUMNS - len(cats))
            fh.write("\t".join([str(int(batch.labels[b])), *counts, *cats]) + "\n")


# -- conversion to blocks ------------------------------------------------------------------
def source_checksum(paths: list[Path]) -> dict:
    """sha256 over the source's files (their bytes, in the order they are read)."""
    digest, size = hashlib.sha256(), 0
    for path in paths:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
                size += len(chunk)
    return {"sha256": digest.hexdigest(), "bytes": size}


def convert_to_blocks(source: str, fmt: str, path: Path, feature_bits: int, names: "TFRecordNames",
                      block_examples: int = BLOCK_EXAMPLES, compress: bool = False) -> Header:
    """`data convert`: every example of `source` (any supported format, plain or gzip) into
    a blocks file; its malformed lines counted and named in the header."""
    from .blocks import BlockSink, write_file

    paths = source_files(source)  # once: the glob must not later match the file being written
    destination = Path(path)
    for source_path in paths if destination.exists() else []:
        if destination.samefile(source_path):
            raise DataFileError(f"{destination}: is the source {source_path} (matched by {source}); converting a "
                                f"file onto itself would replace the data with its conversion: choose another DST")
    report_box = {}

    def fill(writer):
        sink = BlockSink(writer, feature_bits, block_examples)
        _, report_box["report"] = read_files(paths, fmt, feature_bits, names=names, sink=sink)
        sink.flush()
        return sink

    def header_for(sink):
        report = report_box["report"]
        if sink.examples == 0:  # an empty blocks file would pass for a conversion
            first = f"; first malformed: {report.first_bad[0]}" if report.first_bad else ""
            raise DataFileError(f"{source}: no well-formed {fmt} example to convert ({report.bad} malformed "
                                f"line{'' if report.bad == 1 else 's'}{first}); {path} not written")
        origin = {"path": source, "format": fmt, "files": [str(p) for p in paths], **source_checksum(paths)}
        return Header(feature_bits, sink.dtype, block_examples, sink.blocks, sink.examples, sink.entries, origin,
                      report.bad, report.first_bad)

    return write_file(Path(path), header_for, fill, compress)


# Blocks are written by `blocks.write_blocks`, which also needs the keys' feature_bits.
WRITERS = {"libsvm": write_libsvm, "tfrecord": write_tfrecord, "criteo": write_criteo}


# -- a cell's examples (the order is train/inputs/open.py's) -------------------------
def tfrecord_names(spec) -> TFRecordNames:
    """The TFRecord feature names a cell's `[data]` sets (every read of its files uses them)."""
    return TFRecordNames(spec.ids_feature, spec.values_feature, spec.label_feature)


def held_out_examples(spec, eval_examples: int, names: TFRecordNames) -> tuple[SparseBatch, int, str]:
    """(held-out set, examples of the source training must skip, where it came from): the
    first `eval_examples` of `eval_source`, or else the first `eval_examples` of the source
    (then training starts after them: a pipeline can stream a file it cannot hold, and the
    end of such a file is only known after reading it all)."""
    if spec.eval_source is not None:
        held, report = read(spec.eval_source, spec.format, spec.feature_bits, eval_examples, names=names)
        check_bad(spec, "eval_source", report)
        return held, 0, f"the first {held.batch_size} examples of eval_source"
    held, report = read(spec.source, spec.format, spec.feature_bits, eval_examples, names=names)
    if held.batch_size < eval_examples:
        raise DataFileError(f"{spec.source}: {held.batch_size} examples, not even the {eval_examples} held out "
                            f"(eval_examples) and a batch")
    return held, eval_examples, f"the first {eval_examples} examples of source (training starts after them)"


def check_bad(spec, key: str, report: ReadReport) -> None:
    if report.bad_fraction > spec.max_bad_fraction:
        total = report.examples + report.bad
        raise DataFileError(f"{key}: {report.bad} of {total} examples malformed ({report.bad_fraction:.2%} > "
                            f"max_bad_fraction {spec.max_bad_fraction:.2%}); first: {report.first_bad[0]}")
