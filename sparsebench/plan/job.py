"""A worker's job: what the orchestrator asks one worker process to do, as one typed value.

The orchestrator writes it as `jobs.json` and the worker (`python -m
sparsebench.train.worker --jobs FILE`) reads it back; unknown keys are refused, so a
setting that one side writes and the other never reads cannot pass unnoticed.

The JSON keys are a protocol with the worker of another interpreter (`sparsebench ab`
runs the other side's worker with this side's job): keys are only ever added, and a
worker of protocol 1 ignores the ones it does not know (`round`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..errors import ConfigError
from .cell import Cell

ISOLATIONS = ("cell", "env")


@dataclass(frozen=True)
class RemoteCluster:
    """A real cluster from `run --cluster FILE`: its task addresses and where they came from."""

    cluster: dict[str, list[str]]
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {"cluster": self.cluster, "source": self.source}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RemoteCluster":
        _known(data, ("cluster", "source"), "job.cluster")
        return cls(cluster=data["cluster"], source=str(data["source"]))


@dataclass(frozen=True)
class StepsRequest:
    """A number of steps per cell and a folder for what they leave: in the job as
    `{"steps": N, "dir": folder}` under the key `KEY`."""

    steps: int
    folder: str
    KEY: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "dir": self.folder}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        _known(data, ("steps", "dir"), f"job.{cls.KEY}")
        return cls(steps=int(data["steps"]), folder=str(data["dir"]))


@dataclass(frozen=True)
class ProfileRequest(StepsRequest):
    """`sparsebench profile`: profile `steps` steps per cell into `folder/<cell id>/`."""

    KEY: ClassVar[str] = "profile"


@dataclass(frozen=True)
class CountRequest(StepsRequest):
    """`sparsebench ab --count`: count `steps` steps per cell under callgrind (the worker
    runs under valgrind; its dumps go to `folder`)."""

    KEY: ClassVar[str] = "count"


@dataclass(frozen=True)
class BoundRequest:
    """`sparsebench bound`: measure each cell's memory bound only (no model trained)."""

    KEY: ClassVar[str] = "bound"

    def to_dict(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BoundRequest":
        _known(data, (), "job.bound")
        return cls()


@dataclass(frozen=True)
class Job:
    """The cells one worker process runs, in order, and how."""

    cells: tuple[Cell, ...]
    isolation: str = "cell"  # recorded with every record
    round: int = 1  # which of each cell's processes this worker is
    lockstep: bool = False  # wait for the parent's <i>.go before each cell (sparsebench ab)
    private_network: bool = False  # the worker runs in a network namespace of its own: bring `lo` up
    cluster: RemoteCluster | None = None  # parameter-server cells run against this real cluster
    profile: ProfileRequest | None = None  # profile instead of timing windows
    count: CountRequest | None = None  # count instructions under callgrind instead of timing windows
    bound: BoundRequest | None = None  # measure the memory bound only (sparsebench bound)

    def to_json(self) -> str:
        payload: dict[str, Any] = {"cells": [c.to_dict() for c in self.cells], "isolation": self.isolation,
                                   "round": self.round, "lockstep": self.lockstep,
                                   "private_network": self.private_network}
        if self.cluster is not None:
            payload["cluster"] = self.cluster.to_dict()
        if self.profile is not None:
            payload["profile"] = self.profile.to_dict()
        if self.count is not None:
            payload["count"] = self.count.to_dict()
        if self.bound is not None:
            payload["bound"] = self.bound.to_dict()
        return json.dumps(payload)

    @classmethod
    def from_json(cls, text: str) -> "Job":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ConfigError("job: not a JSON object")
        _known(data, ("cells", "isolation", "round", "lockstep", "private_network", "cluster", "profile", "count",
                      "bound"), "job")
        if data.get("isolation", "cell") not in ISOLATIONS:
            raise ConfigError(f"job.isolation: one of {', '.join(ISOLATIONS)}, got {data.get('isolation')!r}")
        return cls(
            cells=tuple(Cell.from_dict(c) for c in data["cells"]),
            isolation=data.get("isolation", "cell"),
            round=int(data.get("round", 1)),
            lockstep=bool(data.get("lockstep", False)),
            private_network=bool(data.get("private_network", False)),
            cluster=RemoteCluster.from_dict(data["cluster"]) if data.get("cluster") else None,
            profile=ProfileRequest.from_dict(data["profile"]) if data.get("profile") else None,
            count=CountRequest.from_dict(data["count"]) if data.get("count") else None,
            bound=BoundRequest.from_dict(data["bound"]) if data.get("bound") is not None else None,
        )

    def write(self, path: Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def read(cls, path: Path) -> "Job":
        return cls.from_json(Path(path).read_text())


def _known(data: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(data) - set(keys))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(keys)})")
