"""The `blocks` format: examples as raw little-endian arrays, a few hundred per block, the
fastest way to feed the fused layer from a file.

Why it exists: text and `tf.train.Example` pay a parse per example (numbers from text,
protobuf fields); a block is decoded with four `decode_raw` calls and no per-example work,
so the input pipeline costs a few microseconds of CPU per example.

Layout, version 1. A TFRecord file (its framing and CRCs guard each record; plain, or
gzip as TFRecord allows) whose records are:

- record 0, the header: `MAGIC` then UTF-8 JSON: `version`, `feature_bits` (keys are
  already in `[0, 2**feature_bits)`), `key_dtype` (`int32` up to 31 bits, else `int64`),
  `block_examples`, `blocks`, `examples`, `entries`, `source` (path, format, bytes and
  sha256 of what was converted; null for `data write`), `malformed` and `first_malformed`
  (the source's bad lines, found and counted at convert time: they are not in the file);
- records 1..: one block each: `int32 n, int32 nnz`, then `int32 row_lengths[n]`,
  `float32 labels[n]`, keys `[nnz]` (`key_dtype`), `float32 values[nnz]`.

Every block holds `block_examples` examples except the file's last. Keys within an
example are sorted and unique (they come from the readers in `datafiles`), values finite.
A cell reads a blocks file only with the `feature_bits` it was written with: above, the
higher bits are gone; below, keys would collide within an example, where the text readers
keep one value per key (convert again instead).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import SparseBatch

MAGIC = b"SPARSEBENCH-BLOCKS\n"
VERSION = 1
BLOCK_EXAMPLES = 256
_BLOCK_HEAD = 8  # int32 n, int32 nnz


class BlocksError(ValueError):
    """A blocks file that cannot be read: not one, a newer version, truncated or corrupt."""


@dataclass(frozen=True)
class Header:
    """What record 0 of a blocks file says."""

    feature_bits: int
    key_dtype: str
    block_examples: int
    blocks: int
    examples: int
    entries: int
    source: dict | None
    malformed: int
    first_malformed: list
    version: int = VERSION

    def to_json(self) -> bytes:
        return MAGIC + json.dumps(self.__dict__, sort_keys=True).encode()


def key_dtype(feature_bits: int) -> str:
    return "int32" if feature_bits <= 31 else "int64"


def encode_block(batch: SparseBatch, dtype: str) -> bytes:
    """One block's bytes (see the module docstring)."""
    lengths = np.diff(batch.row_splits).astype("<i4")
    return (np.array([batch.batch_size, batch.nnz], "<i4").tobytes() + lengths.tobytes()
            + batch.labels.astype("<f4").tobytes() + batch.keys.astype("<i4" if dtype == "int32" else "<i8").tobytes()
            + batch.values.astype("<f4").tobytes())


def decode_block(raw: bytes, dtype: str, where: str, header: "Header | None" = None) -> SparseBatch:
    """A block's bytes back into examples, every length checked against the record's; with
    the file's `header`, also what the text readers check of a line: keys in
    `[0, 2**feature_bits)`, finite values and labels, at most `block_examples` examples.
    A blocks file is input like any other: a hand-made or damaged one is named here, not
    by TensorFlow deep inside a cell."""
    if len(raw) < _BLOCK_HEAD:
        raise BlocksError(f"{where}: {len(raw)} bytes, shorter than a block's 8-byte head")
    n, nnz = (int(x) for x in np.frombuffer(raw, "<i4", 2))
    key_bytes = 4 if dtype == "int32" else 8
    expected = _BLOCK_HEAD + 8 * n + (key_bytes + 4) * nnz
    if n < 0 or nnz < 0 or len(raw) != expected:
        raise BlocksError(f"{where}: {len(raw)} bytes, but its head (n={n}, nnz={nnz}) needs {expected}")
    at = _BLOCK_HEAD
    lengths = np.frombuffer(raw, "<i4", n, at)
    labels = np.frombuffer(raw, "<f4", n, at + 4 * n)
    keys = np.frombuffer(raw, "<i4" if dtype == "int32" else "<i8", nnz, at + 8 * n)
    values = np.frombuffer(raw, "<f4", nnz, at + 8 * n + key_bytes * nnz)
    if lengths.min(initial=0) < 0:
        at_example = int(np.argmin(lengths))
        raise BlocksError(f"{where}: example {at_example} has row length {int(lengths[at_example])}, below 0")
    if int(lengths.sum()) != nnz:
        raise BlocksError(f"{where}: row lengths sum to {int(lengths.sum())}, not nnz={nnz}")
    if header is not None:
        _check_contents(where, header, n, labels, keys, values)
    splits = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=splits[1:])
    return SparseBatch(splits, keys.astype(np.int64), values.astype(np.float32), labels.astype(np.float32))


def _check_contents(where: str, header: "Header", n: int, labels, keys, values) -> None:
    if n > header.block_examples:
        raise BlocksError(f"{where}: {n} examples, more than the header's block_examples {header.block_examples}")
    limit = 1 << header.feature_bits
    if len(keys) and (int(keys.min()) < 0 or int(keys.max()) >= limit):
        bad = int(keys.min()) if int(keys.min()) < 0 else int(keys.max())
        raise BlocksError(f"{where}: key {bad} is outside [0, 2**{header.feature_bits}) (the header's feature_bits)")
    for name, array in (("value", values), ("label", labels)):
        finite = np.isfinite(array)
        if not finite.all():
            raise BlocksError(f"{where}: a {name} is {array[~finite][0]} (not finite); the text readers leave such "
                              f"an example out: convert the source again")


def _records(path: Path):
    """(record number, bytes) of a TFRecord file; a broken one is one BlocksError naming the
    block (record 0 is the header, record k is block k)."""
    import tensorflow as tf

    from .paths import is_gzip

    records = iter(tf.data.TFRecordDataset(str(path), compression_type="GZIP" if is_gzip(path) else ""))
    number = 0
    while True:
        try:
            raw = next(records)
        except StopIteration:
            return
        except (tf.errors.DataLossError, tf.errors.OutOfRangeError, tf.errors.InvalidArgumentError) as exc:
            what = "the header" if number == 0 else f"block {number}"
            reason = tf_reason(exc.message) or type(exc).__name__
            raise BlocksError(f"{path}: {what} is truncated or corrupt ({reason})") from None
        yield number, raw.numpy()
        number += 1


def tf_reason(message: str) -> str:
    """TensorFlow's error text without the graph's node names and op suffix."""
    import re

    text = message.splitlines()[0] if message else ""
    text = re.sub(r"^\{\{[^}]*\}\}\s*", "", text)
    return re.sub(r"\s*\[Op:[^\]]*\].*$", "", text).strip()


# The header's counts and the range each must be in (feature_bits as DataSpec allows).
HEADER_COUNTS = {"feature_bits": (1, 63), "block_examples": (1, None), "blocks": (0, None), "examples": (0, None),
                 "entries": (0, None), "malformed": (0, None)}
# What a converted file's header says of its source (`data inspect` prints each).
SOURCE_FIELDS = {"path": str, "format": str, "bytes": int, "sha256": str}


def parse_header(raw: bytes, path: Path) -> Header:
    if not raw.startswith(MAGIC):
        raise BlocksError(f"{path}: not a sparsebench blocks file (record 0 does not start with "
                          f"{MAGIC.decode().strip()!r})")
    try:
        facts = json.loads(raw[len(MAGIC):])
        header = Header(**facts)
    except (ValueError, TypeError) as exc:
        raise BlocksError(f"{path}: unreadable header ({exc})") from None
    if header.version != VERSION:
        raise BlocksError(f"{path}: blocks format version {header.version}; this sparsebench reads {VERSION}")
    if header.key_dtype not in ("int32", "int64"):
        raise BlocksError(f"{path}: key_dtype {header.key_dtype!r}, expected int32 or int64")
    for name, (low, high) in HEADER_COUNTS.items():
        value = getattr(header, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            allowed = f"{low} to {high}" if high is not None else f"{low} or more"
            raise BlocksError(f"{path}: header {name} is {json.dumps(value)}, expected an integer, {allowed}")
    if not isinstance(header.first_malformed, list) or not all(isinstance(x, str) for x in header.first_malformed):
        raise BlocksError(f"{path}: header first_malformed is not a list of strings")
    if header.source is not None and not (isinstance(header.source, dict) and all(
            isinstance(header.source.get(key), kind) for key, kind in SOURCE_FIELDS.items())):
        raise BlocksError(f"{path}: header source must be null or hold "
                          f"{', '.join(f'{k} ({t.__name__})' for k, t in SOURCE_FIELDS.items())}")
    return header


def read_header(path: Path) -> Header:
    for _, raw in _records(path):
        return parse_header(raw, path)
    raise BlocksError(f"{path}: empty file, no header")


def check_bits(header: Header, feature_bits: int, path: Path) -> None:
    if feature_bits != header.feature_bits:
        raise BlocksError(f"{path}: written with feature_bits {header.feature_bits}, read with {feature_bits}: "
                          f"convert the source again with --feature-bits {feature_bits}")


def iter_blocks(path: Path, feature_bits: int):
    """Each block of `path` as a SparseBatch (the header checked first)."""
    header = None
    blocks = examples = entries = 0
    for number, raw in _records(path):
        if number == 0:
            header = parse_header(raw, path)
            check_bits(header, feature_bits, path)
            continue
        block = decode_block(raw, header.key_dtype, f"{path}: block {number}", header)
        blocks, examples, entries = blocks + 1, examples + block.batch_size, entries + block.nnz
        yield block
    if header is None:
        raise BlocksError(f"{path}: empty file, no header")
    if (blocks, examples, entries) != (header.blocks, header.examples, header.entries):
        raise BlocksError(f"{path}: the header says {header.blocks} blocks, {header.examples} examples, "
                          f"{header.entries} entries; the file holds {blocks}, {examples}, {entries} (cut at a "
                          f"block boundary, or blocks added or lost): convert the source again")


class BlockSink:
    """Takes examples one at a time (the readers' `add(label, features)`), writes a block of
    `block_examples` at a time to an open TFRecord writer."""

    def __init__(self, writer, feature_bits: int, block_examples: int = BLOCK_EXAMPLES):
        self.writer, self.dtype, self.block_examples = writer, key_dtype(feature_bits), block_examples
        self.splits, self.keys, self.values, self.labels = [0], [], [], []
        self.examples = self.entries = self.blocks = 0

    def add(self, label: float, features: dict[int, float]) -> None:
        for key in sorted(features):
            self.keys.append(key)
            self.values.append(features[key])
        self.splits.append(len(self.keys))
        self.labels.append(label)
        if len(self.labels) == self.block_examples:
            self.flush()

    def add_batch(self, batch: SparseBatch) -> None:
        for start in range(0, batch.batch_size, self.block_examples):
            self._write(batch.slice(start, min(start + self.block_examples, batch.batch_size)))

    def flush(self) -> None:
        if self.labels:
            self._write(SparseBatch(np.array(self.splits, np.int64), np.array(self.keys, np.int64),
                                    np.array(self.values, np.float32), np.array(self.labels, np.float32)))
            self.splits, self.keys, self.values, self.labels = [0], [], [], []

    def _write(self, batch: SparseBatch) -> None:
        self.writer.write(encode_block(batch, self.dtype))
        self.examples += batch.batch_size
        self.entries += batch.nnz
        self.blocks += 1

    def __len__(self) -> int:  # what the readers' builders report: examples taken so far
        return self.examples + len(self.labels)

    def batch(self) -> None:
        return None


def write_file(path: Path, header_for, fill, compress: bool) -> Header:
    """Blocks to a temporary file, then the final file: the header (which needs the counts)
    and the blocks copied after it, renamed into place only when complete."""
    import tensorflow as tf

    options = tf.io.TFRecordOptions(compression_type="GZIP" if compress else "")
    body, final = path.with_name(path.name + ".blocks-body"), path.with_name(path.name + ".partial")
    try:
        with tf.io.TFRecordWriter(str(body)) as writer:
            sink = fill(writer)
        header = header_for(sink)
        with tf.io.TFRecordWriter(str(final), options) as writer:
            writer.write(header.to_json())
            for raw in tf.data.TFRecordDataset(str(body)):
                writer.write(raw.numpy())
        os.replace(final, path)
        return header
    finally:
        for leftover in (body, final):
            leftover.unlink(missing_ok=True)


def write_blocks(batch: SparseBatch, path: Path, compress: bool = False, feature_bits: int = 20,
                 block_examples: int = BLOCK_EXAMPLES) -> Header:
    """`data write --format blocks`: examples straight from the generator."""

    def fill(writer):
        sink = BlockSink(writer, feature_bits, block_examples)
        sink.add_batch(batch)
        return sink

    return write_file(Path(path), lambda s: Header(feature_bits, s.dtype, block_examples, s.blocks, s.examples,
                                                    s.entries, None, 0, []), fill, compress)
