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
    {"event": "cells", "cells": [...], "header": {},  start
     "turns": true|false}
    {"event": "want-spawn", "round": r, "index": i}   round R
    {"event": "ready", "round": r}                    spawn R I
    {"event": "want", "round": r, "index": i}         go R I
    {"event": "want-time", "round": r, "index": i}    time R I
    {"event": "done", "round": r, "index": i, ...}    abort
    {"event": "round-done", "round": r}
    {"event": "finished"}
    {"event": "error", "message": "..."} (then exit 2)

In `time` mode each round runs every cell once. A side whose workers take turns (`turns`)
asks before it starts a worker (`want-spawn`), before a cell prepares (`want`: data, model,
the first trace) and before it is timed (`want-time`: warm-up, windows, memory bound), so
the parent can let both sides start and prepare together and time one at a time; an older
installation's cell is one turn from `go` to `done`. In `count` mode every cell is counted
under callgrind once, with no gate (counts do not move with the other side's load).
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
    also: tuple[tuple[str, str], ...] = ()  # count mode: (suite file, pattern) whose matching cells are counted too

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
        return cls(**{**data, "overrides": tuple(data.get("overrides", ())), "cells": tuple(data.get("cells", ())),
                      "also": tuple(tuple(pair) for pair in data.get("also", ()))})


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


def check_installation() -> None:
    """Whether the sparsebench this side server runs against offers what it calls: a side
    whose sparsebench predates the side server runs this file's copy from the parent's
    installation (`ab.SHIPPED`), importing its own modules; one too old for that fails
    here, before any cell (its side then runs whole suites with its own `run`)."""
    import inspect

    try:
        from ..plan.job import CountRequest  # noqa: F401
        from ..plan.suite import load_suite  # noqa: F401
        from ..results import ResultsWriter  # noqa: F401
        from .custom_op import needs_custom_op, prebuild, skip_reason  # noqa: F401
        from .env import fingerprint  # noqa: F401
        from .orchestrator import Orchestrator
        from .runner import run_header  # noqa: F401
    except ImportError as exc:
        raise UserError(f"this sparsebench lacks what the side server needs: {exc}") from None
    missing = {"gate", "on_ready", "count"} - set(inspect.signature(Orchestrator).parameters)
    if missing:
        raise UserError(f"this sparsebench's Orchestrator takes no {', '.join(sorted(missing))}")


def takes_turns() -> bool:
    """Whether this installation's workers wait for their turn to be timed (`turns`) and
    its orchestrator can hold a spawn: then the sides prepare side by side and only the
    timing is taken in turns; else (an older installation) each cell is one turn."""
    import inspect
    import subprocess

    from ..lifetime import die_with_parent
    from ..modules import module_command
    from .orchestrator import Orchestrator

    if not {"turn", "before_spawn"} <= set(inspect.signature(Orchestrator).parameters):
        return False
    try:
        done = subprocess.run(module_command(sys.executable, "sparsebench.train.worker", "--protocol"),
                              capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, preexec_fn=die_with_parent)
    except (OSError, subprocess.SubprocessError):
        return False
    return any(line.startswith("features:") and "turns" in line.split() for line in done.stdout.splitlines())


def _cells_and_header(request: SideRequest):
    """The side's cells and its results header, decided by this side's code alone."""
    from ..plan.suite import load_suite
    from .custom_op import needs_custom_op, prebuild, skip_reason
    from .env import fingerprint
    from .runner import run_header

    overrides = [*request.overrides, *(COUNT_OVERRIDES if request.mode == "count" else ())]

    def expand(path: str, patterns: tuple[str, ...]):
        loaded = load_suite(path)
        for assignment in overrides:
            loaded.override(assignment)
        return loaded, [c for c in loaded.cells() if not patterns or any(
            fnmatch.fnmatchcase(name, pattern) for pattern in patterns for name in (c.cell_id, c.label))]

    suite, cells = expand(request.suite_file, request.cells)
    for path, pattern in request.also:  # counted in the same workers: one valgrind start-up for all
        cells += expand(path, (pattern,))[1]
    if request.mode == "count":
        os.environ[COUNT_MARCH[0]] = COUNT_MARCH[1]  # before the op is built: workers inherit it
        cells = [c for c in cells if c.workers == 1 and c.distribution.is_local]
        isolation = "env"
    else:
        cells = [replace(c, measure=replace(c.measure, processes=1)) for c in cells]  # a round is the process
        isolation = suite.isolation
    run_meta = run_header(suite, request.suite_file, overrides, isolation, len(cells),
                          ab={"side": request.side, **request.ab,
                              **({"also": [list(pair) for pair in request.also]} if request.also else {})})
    run_meta["custom_op"] = prebuild(cells)
    reason = skip_reason(run_meta["custom_op"])
    if reason and any(needs_custom_op(c) for c in cells):
        raise UserError(f"{reason}; leave fused_custom_op out with --set variant=...")
    # the op build's answer carries TensorFlow's facts (an older installation's does not)
    facts = run_meta["custom_op"].pop("tensorflow", None) if isinstance(run_meta["custom_op"], dict) else None
    return cells, isolation, {"run": run_meta, "environment": fingerprint(**({"tensorflow": facts} if facts else {}))}


def serve(request: SideRequest, channel: Channel) -> None:
    import inspect

    from ..plan.job import CountRequest
    from ..results import ResultsWriter
    from .orchestrator import Orchestrator

    cells, isolation, header = _cells_and_header(request)
    turns = request.mode == "time" and takes_turns()
    writer = ResultsWriter(Path(request.results), lambda: header)
    try:
        channel.send("cells", cells=[{"id": c.cell_id, "label": c.label} for c in cells], header=header, turns=turns)
        channel.expect("start")
        index_of = {id(c): i for i, c in enumerate(cells)}
        # A cell is done for the other side once its worker has moved on: to its next gate,
        # or out of the process (a worker's exit frees its tables and tears TensorFlow down,
        # seconds of work that must not overlap the other side's timing). The record itself
        # is written at once.
        held: list[dict] = []

        def done(outcome, round_number: int) -> None:
            writer.append(outcome.record)
            held.append({"round": round_number, "index": index_of[id(outcome.cell)], "label": outcome.cell.label,
                         "status": str(outcome.record.status), "reason": outcome.record.reason or ""})

        def flush() -> None:
            while held:
                channel.send("done", **held.pop(0))

        if request.mode == "count":
            Orchestrator(record=lambda outcome: (done(outcome, 1), flush()), isolation=isolation,
                         python=sys.executable,
                         count=CountRequest(request.count_steps, request.count_folder)).run(cells, round=1)
        else:
            for r in range(1, request.rounds + 1):
                channel.expect("round", r)

                def ask(event: str, answer: str, cell, r=r) -> None:
                    flush()
                    channel.send(event, round=r, index=index_of[id(cell)])
                    channel.expect(answer, r, index_of[id(cell)])

                hooks = ({"before_spawn": lambda group: ask("want-spawn", "spawn", group[0]),
                          "turn": lambda cell: ask("want-time", "time", cell)} if turns else {})
                if "after_worker" in inspect.signature(Orchestrator).parameters:
                    hooks["after_worker"] = flush  # an older installation: at the next gate
                Orchestrator(record=lambda outcome, r=r: done(outcome, r), isolation=isolation, python=sys.executable,
                             gate=lambda cell: ask("want", "go", cell), **hooks,
                             on_ready=lambda r=r: channel.send("ready", round=r)).run(cells, round=r)
                flush()
                channel.send("round-done", round=r)
        channel.send("finished")
    finally:
        writer.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--protocol"]:
        try:
            check_installation()
        except UserError as exc:
            print(exc, file=sys.stderr)
            return 2
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
