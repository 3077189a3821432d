"""One side of `sparsebench ab`, run in that side's own interpreter.

Why: before this, the `ab` parent (the head's code) expanded both sides' cells, built both
sides' worker environments (`orchestrator.WORKER_DEFAULTS`, the thread plan) and started
both sides' workers: a change to any of those decisions reached side A too, and an A/B
could not see it (removing the huge-pages default cost the fused cells 5-10% and both
tiers passed). Here every decision that reaches a worker is made by the side's own code:
the parent starts `PYTHON -c BOOT sparsebench.execute.side REQUEST` (`modules.module_command`)
and this module, imported from PYTHON's installation, loads the suite, applies the
overrides, expands the cells, builds the fused op, takes the fingerprint, writes the side's
results file and runs its own `Orchestrator`. The parent only decides whose turn it is.

The protocol (`PROTOCOL`, printed by `--protocol`): one JSON object per line on the
side's stdout (the process's own fd 1 is redirected to stderr, so nothing else can land
there), one command per line on its stdin.

    side -> parent                                    parent -> side
    {"event": "cells", "cells": [...], "header": {}}  start
    {"event": "ready", "round": r}                    round R
    {"event": "want", "round": r, "index": i}         go R I
    {"event": "done", "round": r, "index": i, ...}    abort
    {"event": "round-done", "round": r}
    {"event": "finished"}
    {"event": "error", "message": "..."} (then exit 2)

In `time` mode each round runs every cell once, and a worker waits at the gate (`want`)
until the parent says `go`; in `count` mode every cell is counted under callgrind once,
with no gate (counts do not move with the other side's load).
"""

from __future__ import annotations

import fnmatch
import json
import os
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from ..errors import UserError

PROTOCOL = "1"
MODES = ("time", "count")
# Counted cells run on one thread each (the counts then repeat to a few hundredths of a
# percent), every cell of a side in one worker under valgrind.
COUNT_OVERRIDES = ("intra_op_threads=1", "inter_op_threads=1", "processes=1")
COUNT_MARCH = ("SPARSEBENCH_OPS_MARCH", "x86-64-v3")  # valgrind cannot execute AVX-512 (train.custom_ops.build)


@dataclass(frozen=True)
class SideRequest:
    """What the parent asks one side to do; written as JSON beside the side's log."""

    side: str  # "A" or "B"
    suite_file: str
    overrides: tuple[str, ...]
    mode: str  # one of MODES
    rounds: int
    results: str  # the side's results file (created by the side)
    ab: dict[str, Any] = field(default_factory=dict)  # what the A/B run was, for the header
    count_steps: int = 0
    count_folder: str = ""
    cells: tuple[str, ...] = ()  # shell patterns on a cell's id or label: only these cells (none: every cell)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def read(cls, path: Path) -> "SideRequest":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: cannot read the side's request: {exc}") from None
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise UserError(f"{path}: this sparsebench's side does not know {', '.join(sorted(unknown))}")
        if data.get("mode") not in MODES:
            raise UserError(f"{path}: mode must be one of {', '.join(MODES)}, got {data.get('mode')!r}")
        return cls(**{**data, "overrides": tuple(data.get("overrides", ())), "cells": tuple(data.get("cells", ()))})


class Aborted(Exception):
    """The parent said `abort` or went away."""


class Channel:
    """JSON events out, one-line commands in."""

    def __init__(self, inbox: TextIO, outbox: TextIO):
        self.inbox, self.outbox = inbox, outbox

    def send(self, event: str, **fields: Any) -> None:
        try:
            self.outbox.write(json.dumps({"event": event, **fields}) + "\n")
            self.outbox.flush()
        except (BrokenPipeError, ValueError):
            raise Aborted() from None

    def expect(self, *words: Any) -> None:
        line = self.inbox.readline()
        got = line.split()
        if not got or got[0] == "abort":
            raise Aborted()
        if got != [str(w) for w in words]:
            raise UserError(f"side protocol: expected {' '.join(map(str, words))!r} from the parent, got {line.strip()!r}")


def _cells_and_header(request: SideRequest):
    """The side's cells and its results header, decided by this side's code alone."""
    from ..plan.suite import load_suite
    from .custom_op import needs_custom_op, prebuild, skip_reason
    from .env import fingerprint
    from .runner import run_header

    suite = load_suite(request.suite_file)
    overrides = [*request.overrides, *(COUNT_OVERRIDES if request.mode == "count" else ())]
    for assignment in overrides:
        suite.override(assignment)
    cells = [c for c in suite.cells()
             if not request.cells or any(fnmatch.fnmatchcase(name, pattern) for pattern in request.cells
                                         for name in (c.cell_id, c.label))]
    if request.mode == "count":
        os.environ[COUNT_MARCH[0]] = COUNT_MARCH[1]  # before the op is built: workers inherit it
        cells = [c for c in cells if c.workers == 1 and c.distribution.is_local]
        isolation = "env"
    else:
        cells = [replace(c, measure=replace(c.measure, processes=1)) for c in cells]  # a round is the process
        isolation = suite.isolation
    run_meta = run_header(suite, request.suite_file, overrides, isolation, len(cells),
                          ab={"side": request.side, **request.ab})
    run_meta["custom_op"] = prebuild(cells)
    reason = skip_reason(run_meta["custom_op"])
    if reason and any(needs_custom_op(c) for c in cells):
        raise UserError(f"{reason}; leave fused_custom_op out with --set variant=...")
    return cells, isolation, {"run": run_meta, "environment": fingerprint()}


def serve(request: SideRequest, channel: Channel) -> None:
    from ..plan.job import CountRequest
    from ..results import ResultsWriter
    from .orchestrator import Orchestrator

    cells, isolation, header = _cells_and_header(request)
    writer = ResultsWriter(Path(request.results), lambda: header)
    try:
        channel.send("cells", cells=[{"id": c.cell_id, "label": c.label} for c in cells], header=header)
        channel.expect("start")
        index_of = {id(c): i for i, c in enumerate(cells)}

        def done(outcome, round_number: int) -> None:
            writer.append(outcome.record)
            channel.send("done", round=round_number, index=index_of[id(outcome.cell)], label=outcome.cell.label,
                         status=str(outcome.record.status), reason=outcome.record.reason or "")

        if request.mode == "count":
            Orchestrator(record=lambda outcome: done(outcome, 1), isolation=isolation, python=sys.executable,
                         count=CountRequest(request.count_steps, request.count_folder)).run(cells, round=1)
        else:
            for r in range(1, request.rounds + 1):
                channel.expect("round", r)

                def gate(cell, r=r) -> None:
                    channel.send("want", round=r, index=index_of[id(cell)])
                    channel.expect("go", r, index_of[id(cell)])

                Orchestrator(record=lambda outcome, r=r: done(outcome, r), isolation=isolation, python=sys.executable,
                             gate=gate,
                             on_ready=lambda r=r: channel.send("ready", round=r)).run(cells, round=r)
                channel.send("round-done", round=r)
        channel.send("finished")
    finally:
        writer.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--protocol"]:
        print(PROTOCOL)
        return 0
    if len(argv) != 1:
        print("usage: python -m sparsebench.execute.side --protocol | REQUEST.json", file=sys.stderr)
        return 2
    # The protocol gets its own copy of stdout; fd 1 becomes stderr, so whatever else prints
    # (a library, a subprocess that inherits it) goes to the side's log, not into the channel.
    outbox = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    channel = Channel(sys.stdin, outbox)
    try:
        serve(SideRequest.read(Path(argv[0])), channel)
    except UserError as exc:
        try:
            channel.send("error", message=str(exc))
        except Aborted:
            pass
        return 2
    except (Aborted, KeyboardInterrupt):
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
