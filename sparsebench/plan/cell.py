"""A cell: one point of a suite's matrix, as a plain hashable value.

A cell says what is trained (data, model, batch size, Hogwild workers), where (device) and
with which process-level settings (threads, oneDNN). Its id is derived from exactly those
fields, so the same cell always has the same id: runs can be resumed and compared cell by
cell. Measurement settings are carried along but are not part of the identity.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .spec import TEXT_FORMATS, DataSpec, MeasureSpec, ModelSpec, from_dict

ABBREVIATIONS = {
    "sparse_dense_matmul": "sdm",
    "embedding_lookup_sparse": "els",
    "embedding_lookup_sparse_fast": "elsfast",
    "ragged_embedding_lookup": "ragged",
    "row_partitioned": "row",
    "col_partitioned": "col",
    "fused_custom_op": "fused",
}


NEWER_DATA_FIELDS = ("text_parser",)


def source_name(pattern: str) -> str:
    """A data file's (or glob's) name as a label shows it: no folder, no compression or
    format suffix, only characters a label may hold (`/data/day-01.libsvm.gz` -> `day-01`)."""
    name = Path(pattern).name
    for suffix in (".gz", ".libsvm", ".svm", ".txt", ".tsv", ".tfrecord", ".tfrecords", ".blocks"):
        name = name.removesuffix(suffix)
    return re.sub(r"[^A-Za-z0-9_.*-]+", "_", name) or "data"


@dataclass(frozen=True)
class Threads:
    """Process-level threading. 0 / None mean "TensorFlow's (or the library's) default"."""

    intra_op_threads: int = 0
    inter_op_threads: int = 0
    omp_num_threads: int | None = None
    mkl_num_threads: int | None = None
    kmp_blocktime: int | None = None
    onednn: bool | None = None

    def validate(self) -> None:
        for name in ("intra_op_threads", "inter_op_threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0 (0 = TensorFlow's default)")
        for name in ("omp_num_threads", "mkl_num_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}: must be >= 1")
        if self.kmp_blocktime is not None and self.kmp_blocktime < 0:
            raise ConfigError("kmp_blocktime: must be >= 0")


STRATEGIES = ("local", "parameter_server")


@dataclass(frozen=True)
class Distribution:
    """Where the cell trains: in its worker process (`local`), or on TensorFlow's
    ParameterServerStrategy with `ps_tasks` parameter servers and `worker_tasks` workers,
    the cell's worker acting as the coordinator. Each scheduled function runs
    `steps_per_execution` train steps, so the coordinator's round trip is paid once per
    that many steps (TensorFlow's advice for small steps)."""

    strategy: str = "local"
    ps_tasks: int = 1
    worker_tasks: int = 1
    steps_per_execution: int = 10

    @property
    def is_local(self) -> bool:
        return self.strategy == "local"

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy: must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        for name in ("ps_tasks", "worker_tasks", "steps_per_execution"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1")


@dataclass(frozen=True)
class Cell:
    suite: str
    batch_size: int
    model: ModelSpec
    data: DataSpec = field(default_factory=DataSpec)
    threads: Threads = field(default_factory=Threads)
    workers: int = 1
    measure: MeasureSpec = field(default_factory=MeasureSpec)
    distribution: Distribution = field(default_factory=Distribution)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.workers < 1:
            raise ConfigError(f"workers: must be >= 1, got {self.workers}")
        self.distribution.validate()
        if not self.distribution.is_local:
            if self.workers != 1:
                raise ConfigError("workers: Hogwild threads are a local setting; on parameter servers use worker_tasks")
            if self.model.device != "cpu":
                raise ConfigError("device: parameter-server cells run on the CPU")
            if self.data.input != "memory":
                raise ConfigError("input: parameter-server cells ship their batches to the workers from memory; "
                                  "pipeline input is a local setting")
        self.model.validate()
        self.data.validate()
        self.data.validate_source()
        self.threads.validate()
        self.measure.validate()

    # -- identity ----------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """The fields that make two cells the same configuration."""
        identity = {
            "batch_size": self.batch_size,
            "workers": self.workers,
            "model": asdict(self.model),
            "data": self.data.identity(),
            "threads": asdict(self.threads),
        }
        if not self.distribution.is_local:  # local cells keep the ids they had before the axis existed
            identity["distribution"] = asdict(self.distribution)
        return identity

    @property
    def cell_id(self) -> str:
        digest = hashlib.sha1(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.label}-{digest}"

    @property
    def label(self) -> str:
        """A readable summary: variant, batch, optimizer, device and non-default settings."""
        m, t = self.model, self.threads
        parts = [ABBREVIATIONS.get(m.variant, m.variant)]
        if m.variant == "row_partitioned":
            parts.append(f"{m.partition_strategy}{m.shards}")
        elif m.variant == "col_partitioned":
            parts.append(f"x{m.shards}")
        parts += [f"b{self.batch_size}", m.optimizer]
        if m.learning_rate is not None:
            parts.append(f"lr{m.learning_rate:g}")
        parts.append(m.device)
        if m.out_dim != ModelSpec.out_dim:
            parts.append(f"out{m.out_dim}")
        if m.discretizer:
            parts.append("disc")
        if not m.normalization:
            parts.append("nonorm")
        if t.intra_op_threads or t.inter_op_threads:
            parts.append(f"t{t.intra_op_threads}x{t.inter_op_threads}")
        if t.omp_num_threads is not None:
            parts.append(f"omp{t.omp_num_threads}")
        if t.mkl_num_threads is not None:
            parts.append(f"mkl{t.mkl_num_threads}")
        if t.kmp_blocktime is not None:
            parts.append(f"kmp{t.kmp_blocktime}")
        if t.onednn is not None:
            parts.append("onednn" if t.onednn else "noonednn")
        if self.workers > 1:
            parts.append(f"w{self.workers}")
        d = self.distribution
        if not d.is_local:
            parts.append(f"ps{d.ps_tasks}w{d.worker_tasks}")
        if self.data.source is not None:
            parts.append(f"{self.data.format}-{self.data.input}-{source_name(self.data.source)}")
            if self.data.input == "pipeline" and self.data.format in TEXT_FORMATS and \
                    self.data.text_parser != DataSpec.text_parser:
                parts.append(self.data.text_parser.replace(".", ""))
        return "-".join(parts)

    # -- process settings --------------------------------------------------------
    def environment(self) -> dict[str, str]:
        """Environment variables this cell's worker must start with."""
        env = {"TF_CPP_MIN_LOG_LEVEL": "2"}
        t = self.threads
        if t.omp_num_threads is not None:
            env["OMP_NUM_THREADS"] = str(t.omp_num_threads)
        if t.mkl_num_threads is not None:
            env["MKL_NUM_THREADS"] = str(t.mkl_num_threads)
        if t.kmp_blocktime is not None:
            env["KMP_BLOCKTIME"] = str(t.kmp_blocktime)
        if t.onednn is not None:
            env["TF_ENABLE_ONEDNN_OPTS"] = "1" if t.onednn else "0"
        if self.model.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = "-1"  # a CPU cell never touches a GPU
        return env

    def process_key(self) -> str:
        """Cells with equal keys may share one worker process (isolation = "env")."""
        return json.dumps({"env": self.environment(), "threads": asdict(self.threads)}, sort_keys=True)

    # -- serialization -----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field, less the data settings added since workers of older commits (`ab`,
        the self-gate's baseline) were written, where they hold their default: such a
        worker refuses a field it does not know."""
        data = asdict(self)
        for name in NEWER_DATA_FIELDS:
            if data["data"][name] == getattr(DataSpec, name):
                del data["data"][name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Cell":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown cell field")
        return cls(
            suite=data["suite"],
            batch_size=data["batch_size"],
            workers=data.get("workers", 1),
            model=from_dict(ModelSpec, data["model"]),
            data=from_dict(DataSpec, data.get("data", {})),
            threads=from_dict(Threads, data.get("threads", {})),
            measure=from_dict(MeasureSpec, data.get("measure", {})),
            distribution=from_dict(Distribution, data.get("distribution", {})),
        )

    def axis_values(self) -> dict[str, Any]:
        """Every matrix axis's effective value in this cell, wherever it was set (what
        `[[exclude]]` patterns match)."""
        m = self.model
        return {
            "batch_size": self.batch_size, "workers": self.workers, "variant": m.variant, "shards": m.shards,
            "partition_strategy": m.partition_strategy, "optimizer": m.optimizer, "device": m.device,
            "learning_rate": m.effective_learning_rate, "discretizer": m.discretizer,
            "normalization": m.normalization, "out_dim": m.out_dim, **asdict(self.threads),
            "strategy": self.distribution.strategy, "ps_tasks": self.distribution.ps_tasks,
            "worker_tasks": self.distribution.worker_tasks, "input": self.data.input, "source": self.data.source,
            "format": self.data.format, "text_parser": self.data.text_parser,
        }

    def axes(self) -> dict[str, Any]:
        """The flat view report and compare use (stable key names)."""
        m, t = self.model, self.threads
        return {
            "cell_id": self.cell_id,
            "suite": self.suite,
            "variant": m.variant,
            "shards": m.shards,
            "partition_strategy": m.partition_strategy if m.variant == "row_partitioned" else None,
            "batch_size": self.batch_size,
            "optimizer": m.optimizer,
            "device": m.device,
            "intra_op_threads": t.intra_op_threads,
            "inter_op_threads": t.inter_op_threads,
            "omp_num_threads": t.omp_num_threads,
            "mkl_num_threads": t.mkl_num_threads,
            "kmp_blocktime": t.kmp_blocktime,
            "onednn": t.onednn,
            "workers": self.workers,
            "learning_rate": m.effective_learning_rate,
            "out_dim": m.out_dim,
            "discretizer": m.discretizer,
            "normalization": m.normalization,
            "strategy": self.distribution.strategy,
            "ps_tasks": self.distribution.ps_tasks if not self.distribution.is_local else None,
            "worker_tasks": self.distribution.worker_tasks if not self.distribution.is_local else None,
            "input": self.data.input if self.data.source is not None else None,
            "data_format": self.data.format,
            "text_parser": self.data.text_parser if self.data.input == "pipeline" and self.data.format in
            TEXT_FORMATS else None,
        }
