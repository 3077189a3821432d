"""`input = "pipeline"`: a tf.data pipeline reads, parses and batches a source inside the
timed loop, as real training does.

The pipeline: files read one after another in their sorted order (each plain or gzip by
its own magic bytes, as the memory path reads them), malformed examples dropped, the
held-out examples skipped (the source is checked first, in constant memory,
and a cell whose bad fraction exceeds `max_bad_fraction` fails before timing), repeated,
batched, parsed into a `SparseTensor` in parallel and prefetched. It streams: memory does
not grow with the file. Each pipeline cell also times the pipeline alone, so the record
can say whether training waited for its input.

Parsing matches `datafiles` (the memory path): libsvm keys modulo `2**feature_bits`,
label > 0 is 1; Criteo's splitmix64 keys, computed on uint64 tensors; TFRecord ids modulo
`2**feature_bits`; blocks files (`blocks.py`) decoded a block at a time. Both paths call a line well-formed by the same rules (`datafiles`: the
line patterns, literals of at most 31 characters, values finite in float32; here checked a
chunk of lines at a time, vectorized), so a line is counted malformed exactly where the
pipeline drops it. One difference, documented: a key repeated within an example is kept
twice here (the memory path keeps its last value).
"""

from __future__ import annotations

import time

from ...plan.spec import DataSpec
from .datafiles import (CRITEO_LINE, FIRST_BAD_KEPT, LIBSVM_LINE, MAX_LITERAL, SKIPPED_LINE, ReadReport, is_gzip,
                        source_files, text_line_error)
from .paths import check_gzip_complete

VALIDATE_CHUNK = 256  # lines checked together: the rules run vectorized, not line by line


def _files(spec: DataSpec, reader):
    """One dataset over the source's files in sorted order, each with its own compression."""
    datasets = [reader(str(path), "GZIP" if is_gzip(path) else "") for path in source_files(spec.source)]
    out = datasets[0]
    for more in datasets[1:]:
        out = out.concatenate(more)
    return out


def dataset(spec: DataSpec, batch_size: int, skip: int, checked_clean: bool = False, parse_text=None):
    """(SparseTensor [batch, 2**feature_bits], labels [batch]) batches, forever, with the
    cell's `tf.data` options (`data_options`). `checked_clean`: the whole source was read
    and holds no malformed example (TFRecord then parses a batch at a time). `parse_text`:
    the C++ text parser (`custom_ops.ops.parse_text`), for libsvm and Criteo cells whose
    `text_parser` is "op" (the caller loads it: train/inputs does not import custom_ops)."""
    import tensorflow as tf

    num_features = spec.num_features
    if spec.format in ("libsvm", "criteo") and parse_text is not None:
        lines = _files(spec, lambda path, compression: tf.data.TextLineDataset(path, compression_type=compression))
        chunks = lines.batch(batch_size).map(lambda chunk: parse_text(chunk, spec.format, spec.feature_bits)[:4],
                                             num_parallel_calls=tf.data.AUTOTUNE)
        parsed = _batched_examples(chunks, spec, batch_size, skip, examples_per_element=batch_size)
    elif spec.format in ("libsvm", "criteo"):
        lines = _files(spec, lambda path, compression: tf.data.TextLineDataset(path, compression_type=compression))
        # The examples the memory path counts: no blank (or libsvm comment) line, no malformed
        # one; then the held-out ones are skipped.
        check = _libsvm_ok if spec.format == "libsvm" else _criteo_ok
        lines = (lines.batch(VALIDATE_CHUNK).map(lambda chunk: (chunk, check(chunk))).unbatch()
                 .filter(lambda line, ok: ok).map(lambda line, ok: line))
        if spec.format == "libsvm":
            parse = lambda b: _parse_libsvm(b, num_features)  # noqa: E731
        else:
            parse = lambda b: _parse_criteo(tf.strings.regex_replace(b, "\r$", ""), spec.feature_bits)  # noqa: E731
        batches = lines.skip(skip).repeat().batch(batch_size, drop_remainder=True)
        parsed = batches.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    elif spec.format == "blocks":
        parsed = _blocks(spec, batch_size, skip)
    else:
        records = _files(spec, lambda path, compression: tf.data.TFRecordDataset(path, compression_type=compression))
        features = {spec.ids_feature: tf.io.VarLenFeature(tf.int64),
                    spec.values_feature: tf.io.VarLenFeature(tf.float32),
                    spec.label_feature: tf.io.FixedLenFeature([1], tf.float32)}
        if checked_clean:
            # Batch first, then one parse_example per batch: no per-example work in tf.data.
            # Only where the source was checked and holds no bad record (one would fail its
            # whole batch's parse); else example by example, bad ones dropped.
            batches = records.skip(skip).repeat().batch(batch_size, drop_remainder=True)
            parsed = batches.map(lambda raw: _from_example_batch(tf.io.parse_example(raw, features), spec,
                                                                 num_features), num_parallel_calls=tf.data.AUTOTUNE)
        else:
            examples = records.map(lambda r: tf.io.parse_single_example(r, features),
                                   num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()  # malformed: counted before
            examples = examples.filter(lambda e: tf.reduce_all(tf.math.is_finite(e[spec.values_feature].values))
                                       & tf.reduce_all(tf.math.is_finite(e[spec.label_feature])))
            examples = examples.skip(skip).repeat()
            parsed = examples.batch(batch_size, drop_remainder=True).map(
                lambda b: _from_example_batch(b, spec, num_features), num_parallel_calls=tf.data.AUTOTUNE)
    return parsed.prefetch(tf.data.AUTOTUNE).with_options(_options(data_options()))


COUNT_CHUNK = 8192  # lines the source check hands the parse op at once


def count_text(spec: DataSpec, parse_text) -> ReadReport:
    """The source check of a text pipeline cell parsed by the C++ op: the whole source read
    through `parse_text`, as the pipeline will read it, counting examples and malformed lines
    (the first few named by file and line, with the Python reader's reason). The same counts
    as `datafiles.read(..., keep=False)`, at the op's speed rather than Python's (a 250 MB
    libsvm file: seconds, not 40)."""
    import numpy as np
    import tensorflow as tf

    report = ReadReport()
    for path in source_files(spec.source):
        if is_gzip(path):
            check_gzip_complete(path)  # TensorFlow's reader stops at a cut silently
        lines = tf.data.TextLineDataset(str(path), compression_type="GZIP" if is_gzip(path) else "")
        kinds = lines.batch(COUNT_CHUNK).map(lambda chunk: (chunk, parse_text(chunk, spec.format, spec.feature_bits)[4]),
                                             num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)
        first_line = 1
        for chunk, kind in kinds:
            kind = kind.numpy()
            report.examples += int(np.count_nonzero(kind == 0))
            bad = np.flatnonzero(kind == 2)
            named = bad[:max(0, FIRST_BAD_KEPT - len(report.first_bad))]  # only these need a reason
            for index in named:
                line = chunk[int(index)].numpy().decode("utf-8", errors="replace")
                why = text_line_error(line, spec.format, spec.feature_bits) or "rejected by the C++ parser"
                report.skip(f"{path}:{first_line + int(index)}", why)
            report.bad += len(bad) - len(named)
            first_line += len(kind)
    return report


RAM_BUDGET_BYTES = 1 << 30  # autotune's buffers (prefetch, parallel map) may hold at most this


def data_options() -> dict:
    """The `tf.data` options a pipeline cell runs with (recorded in its `data_source`): a
    private pool of as many threads as the cell's intra-op pool, so input threads do not
    multiply past the cores the cell was given; one thread per input op (the parallel maps
    parallelize across batches); autotune bounded in RAM."""
    import tensorflow as tf

    threads = tf.config.threading.get_intra_op_parallelism_threads() or _cores()
    return {"private_threadpool_size": threads, "max_intra_op_parallelism": 1, "autotune": True,
            "autotune_ram_budget_bytes": RAM_BUDGET_BYTES}


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _options(values: dict):
    import tensorflow as tf

    options = tf.data.Options()
    options.threading.private_threadpool_size = values["private_threadpool_size"]
    options.threading.max_intra_op_parallelism = values["max_intra_op_parallelism"]
    options.autotune.enabled = values["autotune"]
    options.autotune.ram_budget = values["autotune_ram_budget_bytes"]
    return options


def _blocks(spec: DataSpec, batch_size: int, skip: int):
    """Blocks files (`blocks.py`) as batches with no per-example work: records grouped
    `batch_size // block_examples` at a time (at most a batch of examples) and decoded with
    one `decode_raw` per array for the whole group, then a scan that carries the examples
    left over from one group into the next batch, so a batch is whole slices of blocks
    whatever the block and batch sizes. The held-out examples are dropped at the start of
    every pass over the files."""
    import tensorflow as tf

    from .blocks import BlocksError, check_bits, read_header

    paths = source_files(spec.source)
    headers = [read_header(path) for path in paths]
    for header, path in zip(headers, paths):
        check_bits(header, spec.feature_bits, path)
    if len({h.key_dtype for h in headers}) > 1:
        raise BlocksError(f"{spec.source}: files with different key widths (int32 and int64): convert them alike")
    key_dtype = tf.int32 if headers[0].key_dtype == "int32" else tf.int64
    key_bytes = 4 if key_dtype == tf.int32 else 8
    largest_block = max(h.block_examples for h in headers)
    group = max(1, batch_size // largest_block)  # a group never holds more than a batch (when blocks fit one)

    def decode(records):
        """A group of block records -> its examples' arrays, each decoded once for the group
        (each record's slice cut out, the slices joined, then one decode_raw)."""
        head = tf.reshape(tf.io.decode_raw(tf.strings.substr(records, 0, 8), tf.int32), [-1, 2])
        n, nnz = head[:, 0], head[:, 1]

        def array(pos, length, dtype):
            return tf.io.decode_raw(tf.strings.reduce_join(tf.strings.substr(records, pos, length)), dtype)

        lengths = array(tf.fill(tf.shape(n), 8), 4 * n, tf.int32)
        labels = array(8 + 4 * n, 4 * n, tf.float32)
        keys = array(8 + 8 * n, key_bytes * nnz, key_dtype)
        values = array(8 + 8 * n + key_bytes * nnz, 4 * nnz, tf.float32)
        return lengths, labels, tf.cast(keys, tf.int64), values

    records = _files(spec, lambda path, compression: tf.data.TFRecordDataset(path, compression_type=compression)
                     .skip(1))  # each file's header
    groups = records.batch(group).map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    return _batched_examples(groups, spec, batch_size, skip, examples_per_element=group * largest_block)


def _batched_examples(elements, spec: DataSpec, batch_size: int, skip: int, examples_per_element: int):
    """Elements of examples' arrays (row_lengths int32, labels, keys int64, values: decoded
    blocks, parsed lines) -> batches of exactly `batch_size` examples: a scan carries the
    examples left over from one element into the next batch, and drops the held-out ones
    at the start of every pass. Where an element holds at most a batch, a scan step emits
    at most one batch (no dataset per batch)."""
    import tensorflow as tf

    one_batch_per_step = examples_per_element <= batch_size
    passes = elements.enumerate().repeat()
    empty = (tf.constant(skip, tf.int64), tf.zeros([0], tf.int32), tf.zeros([0], tf.float32),
             tf.zeros([0], tf.int64), tf.zeros([0], tf.float32))

    def joined(state, element):
        """The examples left over, then the group's (less those still to skip)."""
        index, (lengths, labels, keys, values) = element
        to_drop = tf.where(index == 0, tf.constant(skip, tf.int64), state[0])  # a new pass: skip again
        drop = tf.minimum(to_drop, tf.size(lengths, out_type=tf.int64))
        dropped_entries = tf.reduce_sum(tf.cast(lengths[:drop], tf.int64))
        return to_drop - drop, (tf.concat([state[1], lengths[drop:]], 0), tf.concat([state[2], labels[drop:]], 0),
                                tf.concat([state[3], keys[dropped_entries:]], 0),
                                tf.concat([state[4], values[dropped_entries:]], 0))

    def cut(to_drop, arrays, batches):
        """The first `batches` batches' worth of examples, and the rest as the new state."""
        lengths, labels, keys, values = arrays
        taken = batches * batch_size
        entries = tf.reduce_sum(tf.cast(lengths[:taken], tf.int64))
        out = (lengths[:taken], labels[:taken], keys[:entries], values[:entries])
        return (to_drop, lengths[taken:], labels[taken:], keys[entries:], values[entries:]), out

    def carry_one(state, element):
        to_drop, arrays = joined(state, element)
        ready = tf.size(arrays[0], out_type=tf.int64) >= batch_size
        rest, out = cut(to_drop, arrays, tf.cast(ready, tf.int64))
        return rest, (ready, *out)

    def carry_many(state, element):
        to_drop, arrays = joined(state, element)
        return cut(to_drop, arrays, tf.size(arrays[0], out_type=tf.int64) // batch_size)

    def batches_of(lengths, labels, keys, values):
        per_batch = tf.reduce_sum(tf.reshape(tf.cast(lengths, tf.int64), [-1, batch_size]), 1)
        splits = tf.concat([tf.zeros([1], tf.int64), tf.cumsum(per_batch)], 0)

        def one(j):
            lo, hi = splits[j], splits[j + 1]
            return (lengths[j * batch_size:(j + 1) * batch_size], labels[j * batch_size:(j + 1) * batch_size],
                    keys[lo:hi], values[lo:hi])

        return tf.data.Dataset.range(tf.size(per_batch, out_type=tf.int64)).map(one)

    def to_sparse(lengths, labels, keys, values):
        # Each entry's row: a 1 where a row starts (rows of no entries stack up; those at
        # the end start at nnz, one past the entries), summed up.
        starts = tf.cumsum(tf.cast(lengths, tf.int64), exclusive=True)
        entries = tf.size(keys, out_type=tf.int64)
        marks = tf.math.unsorted_segment_sum(tf.ones_like(starts), starts, entries + 1)[:entries]
        rows = tf.cumsum(marks) - 1
        sp = tf.SparseTensor(tf.stack([rows, keys], 1), values, [batch_size, spec.num_features])
        return sp, labels  # rows ascending, keys sorted within a row: canonical order

    if one_batch_per_step:
        grouped = (passes.scan(empty, carry_one).filter(lambda ready, *_: ready)
                   .map(lambda ready, *arrays: arrays))
    else:
        grouped = (passes.scan(empty, carry_many).filter(lambda lengths, *_: tf.size(lengths) > 0)
                   .flat_map(batches_of))
    return grouped.map(to_sparse, num_parallel_calls=tf.data.AUTOTUNE)


def _libsvm_ok(lines):
    """Per line of a chunk: an example by `datafiles`' rules (the pattern, literal lengths,
    values finite in float32), computed for the whole chunk at once."""
    import tensorflow as tf

    matches = tf.strings.regex_full_match(lines, LIBSVM_LINE) & tf.logical_not(
        tf.strings.regex_full_match(lines, SKIPPED_LINE["libsvm"]))
    tokens = tf.strings.split(tf.strings.strip(lines))  # ragged [lines, 1 + pairs]
    rows = tokens.value_rowids()
    # Each line's first token is its label; a blank line has none (its start would be the next
    # line's first token, or past the last token where the chunk ends with it).
    firsts = tf.boolean_mask(tokens.row_splits[:-1], tokens.row_lengths() > 0)
    is_label = tf.scatter_nd(firsts[:, None], tf.ones_like(firsts, tf.bool), tf.shape(tokens.values, out_type=tf.int64))
    # A token's number: the label itself, or the value after a pair's ":".
    after_colon = tf.strings.regex_replace(tokens.values, "^[^:]*:", "")
    literal = tf.where(is_label, tokens.values, after_colon)
    usable = tf.gather(matches, rows) & (tf.strings.length(literal) <= MAX_LITERAL)
    value = tf.strings.to_number(tf.where(usable, literal, "0"), tf.float32)  # rows that failed: never parsed
    token_ok = tf.cast(usable & tf.math.is_finite(value), tf.int32)
    row_ok = tf.math.unsorted_segment_min(token_ok, rows, tf.shape(lines, out_type=tf.int64)[0]) > 0
    return matches & row_ok


def _criteo_ok(lines):
    """Per line of a chunk: a Criteo example (its pattern bounds every literal already)."""
    import tensorflow as tf

    return tf.strings.regex_full_match(lines, CRITEO_LINE)


def _parse_libsvm(lines, num_features: int):
    import tensorflow as tf

    tokens = tf.strings.split(tf.strings.strip(lines))  # ragged [batch, 1 + features]
    firsts = tokens.row_splits[:-1]
    labels = tf.cast(tf.strings.to_number(tf.gather(tokens.values, firsts)) > 0, tf.float32)
    is_pair = tf.tensor_scatter_nd_update(tf.ones_like(tokens.values, tf.bool), firsts[:, None],
                                          tf.zeros_like(firsts, tf.bool))
    pairs = tf.boolean_mask(tokens.values, is_pair)
    rows = tf.boolean_mask(tokens.value_rowids(), is_pair)
    key_value = tf.strings.split(pairs, ":").to_tensor()  # [nnz, 2]: every pair matched the line pattern
    keys = tf.math.floormod(tf.strings.to_number(key_value[:, 0], tf.int64), num_features)
    values = tf.strings.to_number(key_value[:, 1], tf.float32)
    indices = tf.stack([rows, keys], axis=1)
    sp = tf.SparseTensor(indices, values, [tf.shape(lines, out_type=tf.int64)[0], num_features])
    return tf.sparse.reorder(sp), labels


def _splitmix64(x):
    """`datafiles._splitmix64` on uint64 tensors (multiplication and addition wrap)."""
    import tensorflow as tf

    def const(v):
        return tf.constant(v, tf.uint64)

    x = x + const(0x9E3779B97F4A7C15)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, const(30))) * const(0xBF58476D1CE4E5B9)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, const(27))) * const(0x94D049BB133111EB)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, const(31)))


def _hex_values(strings):
    """Hex strings (Criteo's categories) -> int64, digit by digit (TensorFlow parses no hex)."""
    import tensorflow as tf

    codes = tf.strings.unicode_decode(strings, "UTF-8")  # ragged [n, digits]
    c = tf.cast(codes.values, tf.int64)
    digit = tf.where(c >= 97, c - 87, tf.where(c >= 65, c - 55, c - 48))
    lengths = codes.row_lengths()
    position = tf.ragged.range(lengths).values
    power = tf.repeat(lengths, lengths) - 1 - position
    return tf.math.segment_sum(tf.bitwise.left_shift(digit, 4 * power), codes.value_rowids())


def _parse_criteo(lines, feature_bits: int):
    """Criteo lines -> the keys and values `datafiles` gives them (its splitmix64 scheme)."""
    import tensorflow as tf

    from .datafiles import CRITEO_CAT_COLUMNS, CRITEO_INT_COLUMNS

    width = 1 + CRITEO_INT_COLUMNS + CRITEO_CAT_COLUMNS
    fields = tf.strings.split(lines, sep="\t").to_tensor(default_value="", shape=[None, width])
    labels = tf.cast(tf.strings.to_number(fields[:, 0], tf.int64) > 0, tf.float32)
    mask = tf.constant((1 << feature_bits) - 1, tf.uint64)
    batch = tf.shape(fields, out_type=tf.int64)[0]
    # Integer columns: one key per column, the count as its value.
    ints = fields[:, 1:1 + CRITEO_INT_COLUMNS]
    int_where = tf.where(ints != "")
    int_values = tf.strings.to_number(tf.gather_nd(ints, int_where), tf.float32)
    int_keys = tf.bitwise.bitwise_and(_splitmix64(tf.bitwise.left_shift(tf.cast(int_where[:, 1], tf.uint64),
                                                                        tf.constant(32, tf.uint64))), mask)
    # Categorical columns: (column, hex value) hashed, value 1.
    cats = fields[:, 1 + CRITEO_INT_COLUMNS:]
    cat_where = tf.where(cats != "")
    column = tf.cast(cat_where[:, 1] + CRITEO_INT_COLUMNS, tf.uint64)
    hashed = tf.bitwise.left_shift(column, tf.constant(32, tf.uint64)) + tf.cast(_hex_values(tf.gather_nd(cats, cat_where)),
                                                                               tf.uint64)
    cat_keys = tf.bitwise.bitwise_and(_splitmix64(hashed), mask)
    rows = tf.concat([int_where[:, 0], cat_where[:, 0]], 0)
    keys = tf.cast(tf.concat([int_keys, cat_keys], 0), tf.int64)
    values = tf.concat([int_values, tf.ones_like(cat_keys, tf.float32)], 0)
    sp = tf.SparseTensor(tf.stack([rows, keys], axis=1), values, [batch, 1 << feature_bits])
    return tf.sparse.reorder(sp), labels


def _from_example_batch(batch, spec: DataSpec, num_features: int):
    import tensorflow as tf

    ids, values = batch[spec.ids_feature], batch[spec.values_feature]
    keys = tf.math.floormod(ids.values, num_features)
    indices = tf.stack([ids.indices[:, 0], keys], axis=1)
    sp = tf.SparseTensor(indices, values.values, [tf.shape(batch[spec.label_feature], out_type=tf.int64)[0],
                                                  num_features])
    labels = tf.cast(batch[spec.label_feature][:, 0] > 0, tf.float32)
    return tf.sparse.reorder(sp), labels


class Stream:
    """Batches for `measure()`: whatever index is asked for, the pipeline's next batch
    (threads share the one iterator, as Hogwild workers share one input in practice).
    `waited` sums the seconds the train loop spent waiting for a batch."""

    def __init__(self, ds):
        self.iterator = iter(ds)
        self.waited = 0.0

    def __len__(self) -> int:
        return 1 << 30

    def __getitem__(self, index: int):
        start = time.perf_counter()
        batch = next(self.iterator)
        self.waited += time.perf_counter() - start
        return batch


def input_alone(ds, batch_size: int, seconds: float, windows: int) -> tuple[list[float], float]:
    """Samples/s the pipeline delivers with nothing consuming it but a loop, per window; and
    the worker's CPU seconds per example over those windows (every thread: tf.data's pool
    and the loop; nothing else runs then)."""
    iterator = iter(ds)
    next(iterator)  # the first batch pays the pipeline's start
    rates, examples, cpu0 = [], 0, time.process_time()
    for _ in range(windows):
        start, batches = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            next(iterator)
            batches += 1
        rates.append(batches * batch_size / (time.perf_counter() - start))
        examples += batches * batch_size
    return rates, (time.process_time() - cpu0) / max(examples, 1)
