"""Plain, TensorFlow-free descriptions of what a cell trains.

The CLI process builds and validates these without importing TensorFlow; the worker
receives them as JSON and builds the model from them. They are frozen dataclasses so
that the same settings always hash (and therefore identify a cell) the same way.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

from ..errors import ConfigError

VARIANTS = (
    "sparse_dense_matmul",
    "embedding_lookup_sparse",
    "embedding_lookup_sparse_fast",
    "ragged_embedding_lookup",
    "row_partitioned",
    "col_partitioned",
    "fused_custom_op",
)
BASELINE_VARIANT = "sparse_dense_matmul"  # the dense-gradient baseline reports compare against
PARTITIONED_VARIANTS = ("row_partitioned", "col_partitioned")
CUSTOM_OP_VARIANTS = ("fused_custom_op",)  # need the C++ op built (sparsebench ops build)
FUSED_OPTIMIZERS = ("sgd", "lazy_adam")  # updated by the fused ops; others through the gradient
PARTITION_STRATEGIES = ("mod", "div")
OPTIMIZERS = ("sgd", "lazy_adam", "adam", "adagrad", "ftrl")
DEVICES = ("cpu", "gpu")
ACTIVATIONS = ("relu", "linear", "sigmoid", "tanh")

# Learning rates that train the complete model stably on the synthetic data; a suite
# may override them. Adam-family rates are smaller because their steps are normalized.
DEFAULT_LEARNING_RATES = {
    "sgd": 0.05,
    "lazy_adam": 0.002,
    "adam": 0.002,
    "adagrad": 0.05,
    "ftrl": 0.05,
}


DATA_FORMATS = ("libsvm", "criteo", "tfrecord", "blocks")
FILE_FIELDS = ("source", "format", "eval_source", "max_bad_fraction", "input", "ids_feature", "values_feature",
               "label_feature", "text_parser")
TEXT_FORMATS = ("libsvm", "criteo")
# How a pipeline parses text: the C++ op (train/custom_ops/parse_text.cc), or TensorFlow's
# string ops (no compiler needed).
TEXT_PARSERS = ("op", "tf.strings")
INPUTS = ("memory", "pipeline")
PIPELINE_FORMATS = DATA_FORMATS


def unreadable(pattern: str) -> str | None:
    """Why a source file or glob cannot be read (checked when the suite loads), or None."""
    import glob
    import os

    matches = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
    files = [m for m in matches if os.path.isfile(m)]
    if not files:
        return f"{pattern}: no such file"
    for path in files:
        if not os.access(path, os.R_OK):
            return f"{path}: not readable"
    return None


@dataclass(frozen=True)
class DataSpec:
    """Synthetic production-like sparse data (see `sparsebench.train.inputs.data` for how it is drawn)."""

    feature_bits: int = 20
    mean_active: float = 100.0  # mean number of active features per example
    active_sigma: float = 0.5  # log-normal sigma of that count: the tail
    max_active: int = 1000
    zipf_exponent: float = 1.05  # key popularity ~ 1 / rank**s
    binary_fraction: float = 0.5  # share of keys whose value is always 1
    value_decades: float = 6.0  # continuous keys have scales 10**U(0, decades)
    signal_fraction: float = 0.05  # share of keys with a non-zero hidden weight
    signal_scale: float = 2.0  # std of the hidden logit
    seed: int = 0
    # Examples from files instead (sparsebench.train.inputs.datafiles says how keys are mapped):
    source: str | None = None  # a file or glob, plain or gzip
    format: str | None = None  # libsvm | criteo | tfrecord
    eval_source: str | None = None  # held-out examples; default: the last eval_examples of source
    max_bad_fraction: float = 0.001  # malformed lines / records beyond this fail the cell
    # memory: the examples are loaded before timing; pipeline: a tf.data pipeline reads,
    # parses and batches them inside the timed loop (streaming: files may exceed memory)
    input: str = "memory"
    ids_feature: str = "ids"  # tfrecord feature names
    values_feature: str = "values"
    label_feature: str = "label"
    text_parser: str = "op"  # a pipeline of libsvm or Criteo lines: op | tf.strings (TEXT_PARSERS)

    @property
    def parses_text_with_op(self) -> bool:
        return self.input == "pipeline" and self.format in TEXT_FORMATS and self.text_parser == "op"

    @property
    def num_features(self) -> int:
        return 2**self.feature_bits

    def validate(self) -> None:
        _require(1 <= self.feature_bits <= 30, "feature_bits", "must be between 1 and 30")
        _require(self.mean_active > 0, "mean_active", "must be positive")
        _require(self.active_sigma >= 0, "active_sigma", "must be >= 0")
        _require(self.max_active >= 1, "max_active", "must be >= 1")
        _require(self.zipf_exponent >= 0, "zipf_exponent", "must be >= 0")
        _require(0 <= self.binary_fraction <= 1, "binary_fraction", "must be in [0, 1]")
        _require(self.value_decades >= 0, "value_decades", "must be >= 0")
        _require(0 < self.signal_fraction <= 1, "signal_fraction", "must be in (0, 1]")
        _require(self.signal_scale >= 0, "signal_scale", "must be >= 0")
        _require(0 <= self.max_bad_fraction <= 1, "max_bad_fraction", "must be in [0, 1]")
        _require(0 <= self.seed < 2**63, "seed", "must be between 0 and 2**63 - 1")
        _require(self.input in INPUTS, "input", f"must be one of {', '.join(INPUTS)}")
        _require(self.text_parser in TEXT_PARSERS, "text_parser", f"must be one of {', '.join(TEXT_PARSERS)}")
        _require(self.format is None or self.format in DATA_FORMATS, "format", f"one of {', '.join(DATA_FORMATS)}")
        _require(self.input == "memory" or self.format is None or self.format in PIPELINE_FORMATS, "input",
                 f"pipeline input reads {' and '.join(PIPELINE_FORMATS)}; use input = \"memory\" for {self.format}")

    def validate_source(self) -> None:
        """The file settings together (a cell's data, where every axis is resolved)."""
        if self.source is None:
            _require(self.input == "memory", "input", "pipeline reads a source file: set source and format")
            _require(self.eval_source is None, "eval_source", "needs a source file")
        else:
            _require(self.format is not None, "format", f"with a source, one of {', '.join(DATA_FORMATS)}")

    def check_files(self) -> None:
        """Before a run starts (not when a suite is listed): every file it names is readable."""
        for key in ("source", "eval_source"):
            pattern = getattr(self, key)
            if pattern is not None:
                problem = unreadable(pattern)
                _require(problem is None, f"data.{key}", str(problem))

    def identity(self) -> dict[str, Any]:
        """The settings that make two data sets the same: the file settings only where
        set, so synthetic cells keep the ids they had before files existed."""
        data = dataclasses.asdict(self)
        for name in FILE_FIELDS:
            if data[name] == getattr(DataSpec, name):
                del data[name]
        return data


@dataclass(frozen=True)
class ModelSpec:
    """The complete model: discretizer, normalization, sparse layer, head, optimizer."""

    variant: str = "embedding_lookup_sparse"
    shards: int = 1
    partition_strategy: str = "mod"  # row_partitioned only
    out_dim: int = 50
    hidden_units: tuple[int, ...] = (32,)
    activation: str = "relu"
    discretizer: bool = False
    n_bin: int = 16
    normalization: bool = True
    optimizer: str = "sgd"
    learning_rate: float | None = None  # None: DEFAULT_LEARNING_RATES[optimizer]
    device: str = "cpu"
    seed: int = 0

    @property
    def effective_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return DEFAULT_LEARNING_RATES[self.optimizer]

    def validate(self) -> None:
        _require(self.variant in VARIANTS, "variant", f"unknown variant {self.variant!r}; known: {', '.join(VARIANTS)}")
        _require(self.shards >= 1, "shards", "must be >= 1")
        _require(
            self.partition_strategy in PARTITION_STRATEGIES,
            "partition_strategy",
            f"must be one of {', '.join(PARTITION_STRATEGIES)}",
        )
        _require(self.out_dim >= 1, "out_dim", "must be >= 1")
        _require(all(u >= 1 for u in self.hidden_units), "hidden_units", "every layer needs >= 1 unit")
        _require(self.activation in ACTIVATIONS, "activation", f"must be one of {', '.join(ACTIVATIONS)}")
        _require(self.n_bin >= 1, "n_bin", "must be >= 1")
        _require(
            self.optimizer in OPTIMIZERS, "optimizer", f"unknown optimizer {self.optimizer!r}; known: {', '.join(OPTIMIZERS)}"
        )
        _require(self.learning_rate is None or self.learning_rate > 0, "learning_rate", "must be positive")
        _require(self.device in DEVICES, "device", f"must be one of {', '.join(DEVICES)}")
        _require(0 <= self.seed < 2**31, "seed", "must be between 0 and 2**31 - 1")
        if self.variant not in PARTITIONED_VARIANTS:
            _require(self.shards == 1, "shards", f"variant {self.variant!r} is not partitioned; shards must be 1")
        if self.variant == "col_partitioned":
            _require(self.shards <= self.out_dim, "shards", "col_partitioned needs shards <= out_dim")


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def to_dict(spec: Any) -> dict[str, Any]:
    """JSON-ready dict of a spec (tuples become lists)."""
    return dataclasses.asdict(spec)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build a spec from a dict, naming unknown keys instead of failing obscurely."""
    by_name = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(by_name))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown setting; known: {', '.join(by_name)}")
    kwargs = dict(data)
    for name, value in kwargs.items():
        _check_type(name, by_name[name], value)
    if "hidden_units" in kwargs:
        kwargs["hidden_units"] = tuple(kwargs["hidden_units"])
    return cls(**kwargs)


def _check_type(name: str, spec_field: dataclasses.Field, value: Any) -> None:
    """Settings come from TOML and the command line: check them against the field's type."""
    annotation = str(spec_field.type)
    if value is None:
        if "None" not in annotation:
            raise ConfigError(f"{name}: must be set")
        return
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if annotation.startswith("bool"):
        ok, want = isinstance(value, bool), "true or false"
    elif annotation.startswith("int"):
        ok, want = is_int, "an integer"
    elif annotation.startswith("float"):
        # TOML and --set both read `inf` and `nan`: no setting of a cell is meant to be either
        ok, want = (is_int or isinstance(value, float)) and math.isfinite(value), "a finite number"
    elif annotation.startswith("str"):
        ok, want = isinstance(value, str), "a string"
    elif annotation.startswith("tuple"):
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        want = "a list of integers"
    else:
        return
    if not ok:
        raise ConfigError(f"{name}: expected {want}, got {value!r}")



DEFAULT_SECONDS_PER_WINDOW = 2.0
MIN_SECONDS_PER_WINDOW = 0.01


@dataclass(frozen=True)
class MeasureSpec:
    """How a cell is timed. Not part of a cell's identity: the same configuration measured
    with more windows is still the same cell, so runs stay comparable."""

    # Fresh worker processes each cell is measured in, in rounds across the suite's cells:
    # the process, not the window, is the unit of run-to-run noise.
    processes: int = 1
    warmup_steps: int = 10
    windows: int = 5
    # A window ends after `steps_per_window` steps or `seconds_per_window` seconds,
    # whichever comes first; with neither set it lasts DEFAULT_SECONDS_PER_WINDOW.
    steps_per_window: int | None = None
    seconds_per_window: float | None = None
    batch_pool: int = 32  # distinct batches generated ahead and cycled through
    eval_examples: int = 4096  # held-out examples for AUC and eval loss
    # Loss and AUC are measured after this many train steps from the initial weights, before
    # the timing, the same for every cell: after the timed windows a faster cell would have
    # trained more steps (on the same cycled pool) and its quality would not compare.
    quality_steps: int = 100
    diagnostic_steps: int = 3  # steps whose gradient type / rows touched are recorded
    timeout_s: float = 300.0  # per cell, start-up included

    def validate(self) -> None:
        _require(self.processes >= 1, "processes", "must be >= 1")
        _require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        _require(self.windows >= 1, "windows", "must be >= 1")
        _require(self.steps_per_window is None or self.steps_per_window >= 1, "steps_per_window", "must be >= 1")
        _require(self.seconds_per_window is None or self.seconds_per_window >= MIN_SECONDS_PER_WINDOW,
                 "seconds_per_window", f"must be at least {MIN_SECONDS_PER_WINDOW:g} s (a shorter window times the "
                                       f"clock, not the step)")
        _require(self.batch_pool >= 1, "batch_pool", "must be >= 1")
        _require(self.eval_examples >= 2, "eval_examples", "must be >= 2")
        _require(self.quality_steps >= 1, "quality_steps", "must be >= 1")
        _require(self.diagnostic_steps >= 0, "diagnostic_steps", "must be >= 0")
        _require(self.timeout_s > 0, "timeout_s", "must be positive")

    def window_limits(self) -> tuple[int | None, float | None]:
        """(steps, seconds) that end a window; only the ones the suite set, or the default time."""
        if self.steps_per_window is None and self.seconds_per_window is None:
            return None, DEFAULT_SECONDS_PER_WINDOW
        return self.steps_per_window, self.seconds_per_window
