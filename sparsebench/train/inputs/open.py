"""A cell's input, opened in one place, in one order, before any timing:

    held-out set -> malformed-example check -> calibration sample -> training batches

Synthetic cells draw all of it from the generator. Cells with a `source` read files: the
held-out set is the first `eval_examples` of `eval_source`, or else of the source (and
training starts after them); the malformed share is checked against `max_bad_fraction`
(over the examples loaded, or over the whole source for a pipeline, which streams it);
the discretizer calibrates on the first training examples; the batches are either a pool
loaded into memory and cycled, or a tf.data pipeline read inside the timed loop.

What comes back (`CellInput`) is all the trainer and the measurement need; nothing else
in the worker reads a data file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ...plan.cell import Cell
from . import datafiles
from .data import SparseBatch, SyntheticData, to_sparse_tensor

CALIBRATION_MIN_EXAMPLES = 2048


def calibration_examples(batch_size: int) -> int:
    """Examples the discretizer calibrates on: four batches, and at least 2048."""
    return max(4 * batch_size, CALIBRATION_MIN_EXAMPLES)


@dataclass
class CellInput:
    """A cell's examples, ready to train on."""

    num_features: int
    held_out: SparseBatch
    held_out_sp: Any  # held_out as a tf.SparseTensor
    pool: list[SparseBatch]  # batches cycled from memory; [] for a pipeline
    batches: Any  # what the train loop indexes: (SparseTensor, labels) pairs, or the pipeline's Stream
    calibration_sample: SparseBatch | None  # None without a discretizer
    facts: dict[str, Any] | None  # what was read from files (the record's data_source); None for synthetic data
    dataset: Callable[[], Any] | None = None  # a fresh tf.data pipeline (pipeline cells), to time it alone
    stream: Any = None  # the pipeline's Stream that `batches` reads (pipeline cells)

    @property
    def avg_nnz_per_batch(self) -> float | None:
        return float(np.mean([b.nnz for b in self.pool])) if self.pool else None


def open_input(cell: Cell, parse_text: Callable | None = None) -> CellInput:
    """Everything `cell` trains and evaluates on (see the module docstring for the order).
    `parse_text`: the C++ text parser, for pipeline cells that parse text with the op (the
    caller loads it: train/inputs does not import custom_ops)."""
    import tensorflow as tf

    spec, batch_size, measure = cell.data, cell.batch_size, cell.measure
    discretizer = cell.model.discretizer
    dataset = stream = None
    if spec.source is None:
        data = SyntheticData(spec)
        pool = data.batches(batch_size, measure.batch_pool, stream=0)
        held_out = data.held_out(measure.eval_examples)
        calibration = data.sample(calibration_examples(batch_size), stream=5) if discretizer else None
        facts = None
    else:
        names = datafiles.tfrecord_names(spec)
        held_out, skip, held_from = datafiles.held_out_examples(spec, measure.eval_examples, names)
        if spec.input == "pipeline":
            from . import pipeline

            if spec.parses_text_with_op and parse_text is not None:
                report = pipeline.count_text(spec, parse_text)  # the op reads the source as the pipeline will
            else:
                _, report = datafiles.read(spec.source, spec.format, spec.feature_bits, names=names, keep=False)
            datafiles.check_bad(spec, "source", report)
            _require_a_batch(spec, report.examples - skip, skip, batch_size)
            calibration = (datafiles.read(spec.source, spec.format, spec.feature_bits, calibration_examples(batch_size),
                                          skip=skip, names=names)[0] if discretizer else None)
            pool = []
            clean = report.bad == 0  # the whole source was just read: TFRecord may parse by batch
            facts = {"source": spec.source, "format": spec.format, "input": "pipeline", "read": report.to_dict(),
                     "held_out": held_from, "held_out_examples": held_out.batch_size,
                     "tf_data": pipeline.data_options(),
                     "parsing": "per example" if spec.format == "tfrecord" and not clean else "per batch"}
            if spec.format in ("libsvm", "criteo"):
                facts["text_parser"] = spec.text_parser
                if spec.parses_text_with_op and parse_text is None:
                    raise ValueError("a pipeline cell with text_parser = \"op\" needs the op's parse_text")
            text_op = parse_text if spec.parses_text_with_op else None
            dataset = lambda: pipeline.dataset(spec, batch_size, skip, checked_clean=clean,  # noqa: E731
                                               parse_text=text_op)
            stream = pipeline.Stream(dataset())
        else:
            train, report = datafiles.read(spec.source, spec.format, spec.feature_bits, batch_size * measure.batch_pool,
                                           skip=skip, names=names)
            datafiles.check_bad(spec, "source", report)
            _require_a_batch(spec, train.batch_size, skip, batch_size)
            count = train.batch_size // batch_size
            pool = [train.slice(i * batch_size, (i + 1) * batch_size) for i in range(count)]
            calibration = (train.slice(0, min(train.batch_size, calibration_examples(batch_size)))
                           if discretizer else None)
            facts = {"source": spec.source, "format": spec.format, "input": "memory", "read": report.to_dict(),
                     "pool_batches": count, "held_out": held_from, "held_out_examples": held_out.batch_size}
    num_features = spec.num_features
    with tf.device("/CPU:0"):
        batches = stream if stream is not None else [
            (to_sparse_tensor(b, num_features), tf.constant(b.labels)) for b in pool]
        held_out_sp = to_sparse_tensor(held_out, num_features)
    return CellInput(num_features, held_out, held_out_sp, pool, batches, calibration, facts, dataset, stream)


def _require_a_batch(spec, examples: int, skip: int, batch_size: int) -> None:
    if examples < batch_size:
        raise datafiles.DataFileError(f"{spec.source}: {examples} examples to train on after the {skip} held out, "
                                      f"fewer than one batch of {batch_size}")
