"""`sparsebench ab`: two sides measured alternately on one machine, in one command.

Why: two stored runs made minutes apart differ by whatever the shared machine did in
between (tens of percent here), and nothing in either run can tell that drift from a
change of the code. Measuring both sides alternately, round after round, makes the drift
hit both alike, and pairing each round's A with its B cancels it ("duet" benchmarking;
asv's `--interleave-rounds`). The order alternates, A B, B A, A B, ..., so a trend
favours neither side.

A side is an interpreter (`--a-python`: another virtualenv, with another TensorFlow or
another sparsebench) and settings (`--a-set AXIS=V`). **Every decision that reaches a
side's workers is made by that side's own code**: its cells, their environment (the
worker defaults), its thread plan, its op build. The parent only decides whose turn it is.
Two granularities:

- `cell` (the default): each side runs a side server in its own interpreter
  (`execute/side.py`), whose own orchestrator starts the side's workers; the parent
  lets them take turns cell by cell (A times cell 1, B times cell 1, B times cell 2, A
  times cell 2, ...), so the two measurements of a pair are seconds apart (`Lockstep`).
  Both sides start workers and prepare cells side by side; a cell is timed only while the
  other side is parked at a gate, never while its worker starts, prepares or exits. A side
  whose sparsebench predates the side server runs this installation's copy of it against
  its own installation (`SHIPPED`); one too old for that falls back to `suite`.
- `suite`: each side and round is one `PYTHON -m sparsebench run` of the same suite file,
  so any version of sparsebench on either side works; a pair is a whole suite apart.

Every side command is started through `modules.module_command` in the A/B folder, so a
`sparsebench/` in the caller's directory is never imported. Either way each side's
records (one per cell and round, the round as the process) go to one results file
(`a.jsonl`, `b.jsonl`). Deciding which cells changed is `sparsebench.analyze.paired`'s job;
`side_differences` names what differs between the two sides' fingerprints.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError
from ..lifetime import die_with_parent
from ..modules import module_command
from ..plan.suite import load_suite
from ..results import ResultsWriter, read_results
from .orchestrator import last_line
from .side import COUNT_OVERRIDES, PROTOCOL as SIDE_PROTOCOL, SideRequest

SIDES = ("A", "B")


@dataclass
class Side:
    name: str  # "A" or "B"
    python: str
    overrides: list[str] = field(default_factory=list)

    def describe(self) -> str:
        sets = " ".join(f"--set {o}" for o in self.overrides)
        return f"{self.python}{' ' + sets if sets else ''}"


@dataclass
class ABRun:
    folder: Path
    suite_file: Path
    rounds: int
    results: dict[str, Path]  # side name -> its results file (every round)
    seconds: float = 0.0
    order: list[str] = field(default_factory=list)  # the sides in the order they ran
    headers: dict[str, dict] = field(default_factory=dict)  # side name -> its header, as its side server wrote it
    shipped: list[str] = field(default_factory=list)  # sides whose server was this installation's copy (SHIPPED)


def abba_order(rounds: int) -> list[tuple[int, str]]:
    """(round, side) in the order they run: A B, B A, A B, ..."""
    order = []
    for r in range(1, rounds + 1):
        order += [(r, side) for side in (SIDES if r % 2 else SIDES[::-1])]
    return order


def identical(a: Side, b: Side) -> bool:
    """An A/A run: same interpreter, same settings (measures the machine's noise floor)."""
    return (shutil.which(a.python) or a.python) == (shutil.which(b.python) or b.python) and a.overrides == b.overrides


def prepare(suite_arg: str, overrides: list[str], a: Side, b: Side, folder: Path) -> Path:
    """Check both sides' settings here (a bad --a-set fails now, not minutes later) and
    write the suite both sides will run into `folder`."""
    suite = load_suite(suite_arg)
    counts = {}
    for side in (a, b):
        copy = load_suite(suite_arg)
        for assignment in [*overrides, *side.overrides]:
            copy.override(assignment)
        counts[side.name] = len(copy.cells())
    if counts["A"] != counts["B"]:
        raise UserError(f"ab: side A expands to {counts['A']} cells and side B to {counts['B']}; the sides must "
                        f"differ in how a cell runs, not in which cells there are")
    if any((folder / f"{name.lower()}.jsonl").exists() for name in SIDES):
        raise UserError(f"{folder}: already holds an A/B run; choose another --output")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        suite_file = folder / f"{suite.name}.toml"
        suite_file.write_text(suite.text)
    except OSError as exc:
        raise UserError(f"{folder}: cannot write the A/B run here: {exc.strerror}") from None
    return suite_file


def _side_command(side: Side, suite_file: Path, overrides: list[str], output: Path) -> list[str]:
    """One whole-suite round of a side: its own `sparsebench run`, imported from its own
    installation (`module_command`), never from the current directory."""
    sets = [arg for assignment in [*overrides, *side.overrides] for arg in ("--set", assignment)]
    return module_command(side.python, "sparsebench", "run", "--suite", str(suite_file), *sets, "--quiet", "--output",
                          str(output))


def run_ab(*, suite_arg: str, overrides: list[str], a: Side, b: Side, rounds: int, folder: Path,
           say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> ABRun:
    """Run every (round, side) in ABBA order; return where each side's results are."""
    if rounds < 2:
        raise UserError(f"--rounds: a paired comparison needs at least 2 rounds, got {rounds}")
    folder = Path(folder).resolve()
    suite_file = prepare(suite_arg, overrides, a, b, folder)
    sides = {"A": a, "B": b}
    per_round: dict[str, list[Path]] = {"A": [], "B": []}
    started = time.monotonic()
    run = ABRun(folder, suite_file, rounds, {})
    for r, name in abba_order(rounds):
        side = sides[name]
        output = folder / f"{name.lower()}-round{r}.jsonl"
        log = folder / f"{name.lower()}-round{r}.log"
        t0 = time.monotonic()
        with open(log, "w") as fh:
            done = subprocess.run(_side_command(side, suite_file, overrides, output), stdout=fh, cwd=folder,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
        last = last_line(log)
        if done.returncode == 130:
            raise KeyboardInterrupt
        if done.returncode not in (0, 1) or not output.exists():
            raise UserError(f"ab: side {name} ({side.describe()}) round {r} failed: {last or 'no output'} "
                            f"(full log: {log})")
        per_round[name].append(output)
        run.order.append(name)
        say(f"round {r}/{rounds} side {name}: {last} ({time.monotonic() - t0:.0f} s)")
    for name in SIDES:
        run.results[name] = gather(per_round[name], folder / f"{name.lower()}.jsonl", sides[name], rounds)
    run.seconds = time.monotonic() - started
    return run


def gather(round_files: list[Path], path: Path, side: Side, rounds: int) -> Path:
    """One side's round files -> one results file: the first round's header (plus what
    the A/B run was), then every record with its round."""
    first = read_results(round_files[0])
    header = {k: v for k, v in first.header.items() if k not in ("schema", "version")}
    header["ab"] = {"side": side.name, "python": side.python, "overrides": side.overrides, "rounds": rounds}
    with ResultsWriter(path, lambda: header) as writer:
        for r, round_file in enumerate(round_files, start=1):
            for record in read_results(round_file).records:
                writer.append(record.replace(round=r))
    return path


def default_folder(suite_arg: str) -> Path:
    name = Path(suite_arg).stem if suite_arg.endswith(".toml") else suite_arg
    return Path("results") / f"ab-{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def python_of(path: str | None) -> str:
    """The interpreter a side runs: the given one, checked before any round (it must be a
    program that runs `-m sparsebench`), or this one."""
    if path is None:
        return sys.executable
    found = shutil.which(path) if os.sep not in path else path
    if found:
        found = os.path.abspath(found)  # sides run in the A/B folder; a venv's symlink is kept, not resolved
    if not found or not os.path.isfile(found) or not os.access(found, os.X_OK):
        raise UserError(f"{path}: no such Python interpreter (give the path to a virtualenv's bin/python)")
    try:
        done = subprocess.run(module_command(found, "sparsebench", "--version"), capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
    except (OSError, subprocess.SubprocessError) as exc:
        raise UserError(f"{path}: cannot run it as a Python interpreter: {exc}") from None
    if done.returncode != 0 or not done.stdout.startswith("sparsebench"):
        said = (done.stderr.strip().splitlines() or done.stdout.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"{path}: `{path} -m sparsebench --version` failed (exit {done.returncode}: {said[:160]}); "
                        f"install sparsebench into that environment")
    return found




def cell_order(cells: int, round_number: int) -> list[tuple[int, str]]:
    """(cell, side) in the order one round runs them: A B, B A, ... cell by cell, the first
    cell of a round starting with A in odd rounds and with B in even ones."""
    order = []
    for i in range(cells):
        first_a = (i + round_number) % 2 == 1
        order += [(i, side) for side in (SIDES if first_a else SIDES[::-1])]
    return order


# -- the side servers ------------------------------------------------------------------------
# A side whose sparsebench predates the side server runs this installation's copy of
# execute/side.py, executed as if it were that side's own `sparsebench.execute.side`: its
# relative imports resolve to the side's installation, so the side's own orchestrator,
# worker defaults, cell expansion, op build and fingerprint make every decision; the file
# only relays the turns. (Its `--protocol` checks that the side offers what it calls.)
SHIPPED = ("import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; path = sys.argv[1]; "
           "del sys.argv[0]; import sparsebench.execute; "
           "exec(compile(open(path).read(), path, 'exec'), {'__name__': '__main__', "
           "'__package__': 'sparsebench.execute', '__file__': path})")


def side_protocol(python: str) -> str | None:
    """The side protocol `python`'s own sparsebench speaks (None: it has no side server)."""
    return _protocol(module_command(python, "sparsebench.execute.side", "--protocol"))


def _protocol(command: list[str]) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                              preexec_fn=die_with_parent)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.strip().splitlines() if done.returncode == 0 else []
    return lines[0].strip() if lines else None


@dataclass(frozen=True)
class Launcher:
    """How a side's server starts: its own module, or this installation's copy of it run
    against the side's own installation (`shipped`)."""

    command: tuple[str, ...]
    shipped: bool


def side_launcher(python: str) -> Launcher | None:
    """How `python`'s side server starts, or None when its sparsebench can host neither
    (then its side runs whole suites with its own `run`)."""
    if side_protocol(python) == SIDE_PROTOCOL:
        return Launcher(tuple(module_command(python, "sparsebench.execute.side")), False)
    from . import side

    shipped = (python, "-c", SHIPPED, str(Path(side.__file__).resolve()))
    if _protocol([*shipped, "--protocol"]) == SIDE_PROTOCOL:
        return Launcher(shipped, True)
    return None


class SideProcess:
    """A side server (`execute/side.py`) in the side's interpreter: its events go to the
    shared queue as (side name, event); its stderr to `<side>-side.log` in the folder."""

    def __init__(self, side: Side, launcher: Launcher, request: SideRequest, folder: Path,
                 events: "queue.Queue[tuple[str, dict]]"):
        self.side = side
        self.log = folder / f"{side.name.lower()}-side.log"
        request_path = folder / f"{side.name.lower()}-side.json"
        request.write(request_path)
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [*launcher.command, str(request_path)], cwd=folder,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1,
                start_new_session=True,  # Ctrl-C reaches the parent, which tears the sides down
                preexec_fn=die_with_parent)
        self._reader = threading.Thread(target=self._read, args=(events,), name=f"side-{side.name}", daemon=True)
        self._reader.start()

    def _read(self, events) -> None:
        for line in self.process.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue  # not an event (the side keeps its stdout for events only)
            if isinstance(message, dict):
                events.put((self.side.name, message))
        events.put((self.side.name, {"event": "exit", "code": self.process.wait()}))

    def send(self, *words: Any) -> None:
        try:
            self.process.stdin.write(" ".join(map(str, words)) + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass  # it is gone: its exit event says so

    def failure(self, message: dict) -> UserError:
        """The one line that says why this side stopped."""
        if message.get("event") == "error":
            why = message.get("message", "")
        else:
            why = f"its side process exited ({message.get('code')}): {last_line(self.log) or 'no output'}"
        return UserError(f"ab: side {self.side.name} ({self.side.describe()}): {why} (log: {self.log})")

    def kill(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()


class SidePair:
    """The side servers of one A/B run (both sides, or the one side of a counted run that
    has one), their events in one queue."""

    def __init__(self, sides: dict[str, Side], launchers: dict[str, Launcher], requests: dict[str, SideRequest],
                 folder: Path):
        self.events: queue.Queue[tuple[str, dict]] = queue.Queue()
        self.servers: dict[str, SideProcess] = {}
        self.headers: dict[str, dict] = {}
        self.turns: dict[str, bool] = {}  # side -> whether its workers take turns (Lockstep)
        self.finished: set[str] = set()
        try:
            for name, request in requests.items():
                self.servers[name] = SideProcess(sides[name], launchers[name], request, folder, self.events)
        except BaseException:
            self.close()
            raise

    def next_event(self) -> tuple[str, dict]:
        """The next event of either side; a side that failed, or exited before it said it
        finished, ends the run."""
        while True:
            name, message = self.events.get()
            event = message.get("event")
            if event == "finished":
                self.finished.add(name)
            if event == "error" or event == "exit" and name not in self.finished:
                raise self.servers[name].failure(message)
            if event != "exit":
                return name, message

    def cells(self, nothing: str = "") -> dict[str, list[dict]]:
        """Each side's cells, as the side expanded them (both must have as many)."""
        cells: dict[str, list[dict]] = {}
        while len(cells) < len(self.servers):
            name, message = self.next_event()
            if message.get("event") == "cells":
                cells[name] = list(message.get("cells") or [])
                self.headers[name] = message.get("header") or {}
                self.turns[name] = bool(message.get("turns"))
        sizes = {name: len(found) for name, found in cells.items()}
        if len(set(sizes.values())) > 1:
            raise UserError(f"ab: side A expands to {sizes['A']} cells and side B to {sizes['B']}; the sides "
                            f"must differ in how a cell runs, not in which cells there are")
        if not any(sizes.values()):
            raise UserError(f"ab: the suite expands to no cell to measure{nothing}")
        return cells

    def send_all(self, *words: Any) -> None:
        for server in self.servers.values():
            server.send(*words)

    def close(self) -> None:
        for server in self.servers.values():
            server.send("abort")
        for server in self.servers.values():
            server.kill()


def _requests(suite_file: Path, overrides: list[str], sides: dict[str, Side], folder: Path, mode: str, rounds: int,
              ab: dict[str, Any], cells: tuple[str, ...] = (), **count: Any) -> dict[str, SideRequest]:
    names = {"time": "{}.jsonl", "count": "{}-count.jsonl"}
    return {name: SideRequest(side=name, suite_file=str(suite_file), overrides=(*overrides, *side.overrides),
                              mode=mode, rounds=rounds, results=str(folder / names[mode].format(name.lower())),
                              ab={"python": side.python, "overrides": side.overrides, **ab}, cells=cells, **count)
            for name, side in sides.items()}


class Lockstep:
    """Which side may do what next, so that a cell is timed only while the other side is
    parked at a gate (or done with the round), in the round's turn order (`cell_order`).

    A side whose workers take turns (`turns`) asks three times per cell: to start a worker
    (`spawn`), to prepare the cell (`go`: data, model, the first trace) and to be timed
    (`time`: warm-up, windows, memory bound). Starting and preparing never overlap the
    other side's timing, and wait while the other side, parked with the turn, is about to
    be timed; otherwise both sides start and prepare together. An older side's cell is one
    turn, from `go` to `done`, and its workers start when they will."""

    EXCLUSIVE = {True: ("time",), False: ("go",)}  # by `turns`: the asks that start a timed turn

    def __init__(self, order: list[tuple[int, str]], turns: dict[str, bool]):
        self.order = order
        self.turns = turns
        self.position = 0
        self.completed: set[tuple[int, str]] = set()
        self.waiting: dict[str, tuple[str, int] | None] = {name: None for name in SIDES}
        self.timing: dict[str, int | None] = {name: None for name in SIDES}
        self.finished: dict[str, bool] = {name: False for name in SIDES}

    def ask(self, side: str, kind: str, index: int) -> None:
        self.waiting[side] = (kind, index)

    def done(self, side: str, index: int) -> None:
        self.completed.add((index, side))
        self.waiting[side] = None
        if self.timing[side] == index:
            self.timing[side] = None
        while self.position < len(self.order) and self.order[self.position] in self.completed:
            self.position += 1

    def finish(self, side: str) -> None:
        self.finished[side] = True
        self.waiting[side] = None

    def _exclusive(self, side: str, kind: str) -> bool:
        return kind in self.EXCLUSIVE[self.turns[side]]

    def _parked(self, side: str) -> bool:
        return self.waiting[side] is not None or self.finished[side]

    def release(self) -> tuple[str, str, int] | None:
        """(side, ask, cell index) to grant now, if any (the side is then no longer parked)."""
        turn = self.order[self.position] if self.position < len(self.order) else None
        for side in SIDES:
            if self.waiting[side] is None:
                continue
            kind, index = self.waiting[side]
            other = SIDES[1 - SIDES.index(side)]
            if self._exclusive(side, kind):
                ok = turn == (index, side) and self._parked(other)
            else:
                other_kind = self.waiting[other][0] if self.waiting[other] else None
                other_next = (turn is not None and turn[1] == other and other_kind is not None
                              and self._exclusive(other, other_kind))
                ok = self.timing[other] is None and not other_next
            if ok:
                self.waiting[side] = None
                if self._exclusive(side, kind):
                    self.timing[side] = index
                return side, kind, index
        return None


ANSWERS = {"want-spawn": "spawn", "want": "go", "want-time": "time"}


def run_interleaved(*, suite_arg: str, overrides: list[str], a: Side, b: Side, rounds: int, folder: Path,
                    launchers: dict[str, Launcher], cells: tuple[str, ...] = (),
                    say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> ABRun:
    """Every round: a fresh worker per side (started by the side's own server), taking turns
    cell by cell (see the module)."""
    if rounds < 2:
        raise UserError(f"--rounds: a paired comparison needs at least 2 rounds, got {rounds}")
    folder = Path(folder).resolve()
    suite_file = prepare(suite_arg, overrides, a, b, folder)
    sides = {"A": a, "B": b}
    requests = _requests(suite_file, overrides, sides, folder, "time", rounds, {"rounds": rounds, "interleave": "cell"},
                         cells)
    run = ABRun(folder, suite_file, rounds, {name: Path(r.results) for name, r in requests.items()})
    started = time.monotonic()
    pair = SidePair(sides, launchers, requests, folder)
    try:
        expanded = pair.cells(f" matching {', '.join(cells)}" if cells else "")
        run.headers = pair.headers
        pair.send_all("start")
        for r in range(1, rounds + 1):
            t0 = time.monotonic()
            lockstep = Lockstep(cell_order(len(expanded["A"]), r), pair.turns)
            counts = {name: Counter() for name in SIDES}
            pair.send_all("round", r)
            while not all(lockstep.finished.values()):
                name, message = pair.next_event()
                event = message.get("event")
                if message.get("round") != r:
                    continue
                if event in ANSWERS:
                    lockstep.ask(name, ANSWERS[event], int(message["index"]))
                elif event == "done":
                    counts[name][message.get("status", "?")] += 1
                    lockstep.done(name, int(message["index"]))
                elif event == "round-done":
                    lockstep.finish(name)
                granted = lockstep.release()
                while granted is not None:
                    side, kind, index = granted
                    if lockstep.timing[side] == index:
                        run.order.append(side)
                    pair.servers[side].send(kind, r, index)
                    granted = lockstep.release()
            summary = "; ".join(f"{name}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts[name].items()))
                                for name in SIDES)
            say(f"round {r}/{rounds}: {summary} ({time.monotonic() - t0:.0f} s)")
        _wait_finished(pair)
    finally:
        pair.close()
    run.seconds = time.monotonic() - started
    return run


def _wait_finished(pair: SidePair) -> None:
    while len(pair.finished) < len(pair.servers):
        pair.next_event()


# -- counted work (ab --count) ---------------------------------------------------------------
def also_suites(specs: tuple[str, ...], folder: Path) -> tuple[tuple[str, str], ...]:
    """`--count-also SUITE@PATTERN`: each suite checked and written into the A/B folder, with
    the pattern its cells must match."""
    out = []
    for spec in specs:
        name, _, pattern = spec.rpartition("@")
        if not name or not pattern:
            raise UserError(f"--count-also {spec!r}: write SUITE@PATTERN (a suite name or file, and a cell pattern)")
        suite = load_suite(name)
        path = folder / f"{suite.name}-also.toml"
        path.write_text(suite.text)
        out.append((str(path), pattern))
    return tuple(out)


def run_counted(*, suite_arg: str, overrides: list[str], a: Side, b: Side, folder: Path, steps: int,
                cells: tuple[str, ...] = (), also: tuple[str, ...] = (),
                say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> ABRun:
    """Count every cell of both sides under callgrind, the two sides concurrently, each by
    its own code: a side server in count mode, or, for a side whose sparsebench predates
    it, that side's own `ab --count` (an A/A of itself, whose side A is kept)."""
    from .counting import unavailable

    if steps < 1:
        raise UserError(f"--count-steps: must be >= 1, got {steps}")
    problem = unavailable()
    if problem:
        raise UserError(f"ab --count: counting needs valgrind's callgrind, but {problem}")
    folder = Path(folder).resolve()
    suite_file = prepare(suite_arg, [*overrides, *COUNT_OVERRIDES], a, b, folder)
    sides = {"A": a, "B": b}
    run = ABRun(folder, suite_file, 1, {})
    started = time.monotonic()
    launchers = {name: side_launcher(side.python) for name, side in sides.items()}
    if (cells or also) and not all(launchers.values()):
        raise UserError(f"ab --cells/--count-also: side {next(n for n, m in launchers.items() if not m)}'s "
                        f"sparsebench cannot host a side server and cannot pick cells; give a suite of just those "
                        f"cells instead")
    extra = also_suites(also, folder)
    older = {name: _OwnCount(side, suite_file, overrides, folder, steps) for name, side in sides.items()
             if launchers[name] is None}
    for name, own in older.items():
        say(f"counted side {name}: its sparsebench cannot host a side server; counting with its own `ab --count`")
    run.shipped = [name for name, launcher in launchers.items() if launcher is not None and launcher.shipped]
    requests = _requests(suite_file, overrides, {n: s for n, s in sides.items() if launchers[n]}, folder, "count", 1,
                         {"count_steps": steps}, cells, count_steps=steps, count_folder="", also=extra)
    for name, request in requests.items():
        dumps = folder / f"callgrind-{name.lower()}"
        dumps.mkdir(exist_ok=True)
        requests[name] = SideRequest(**{**request.__dict__, "count_folder": str(dumps)})
    pair = SidePair(sides, launchers, requests, folder) if requests else None
    try:
        if pair is not None:
            pair.cells(f"{f' matching {chr(44).join(cells)}' if cells else ''} (Hogwild and parameter-server cells "
                       f"are timed only)")
            run.headers = pair.headers
            pair.send_all("start")
            while len(pair.finished) < len(pair.servers):
                name, message = pair.next_event()
                if message.get("event") == "done":
                    reason = f" ({message['reason']})" if message.get("reason") else ""
                    say(f"counted side {name}: {message.get('label')}: {message.get('status')}{reason}")
        for name, own in older.items():
            run.results[name] = own.wait()
    finally:
        if pair is not None:
            pair.close()
        for own in older.values():
            own.kill()
    for name, request in requests.items():
        run.results[name] = Path(request.results)
    run.order = list(SIDES)
    run.seconds = time.monotonic() - started
    return run


class _OwnCount:
    """An older side's counted cells, by its own code: `PYTHON -m sparsebench ab --count`
    with that interpreter on both sides, started in the A/B folder."""

    def __init__(self, side: Side, suite_file: Path, overrides: list[str], folder: Path, steps: int):
        self.side = side
        self.out = folder / f"own-count-{side.name.lower()}"
        self.log = folder / f"own-count-{side.name.lower()}.log"
        sets = [arg for assignment in [*overrides, *side.overrides] for arg in ("--set", assignment)]
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                module_command(side.python, "sparsebench", "ab", "--count", "--suite", str(suite_file), *sets,
                               "--a-python", side.python, "--b-python", side.python, "--count-steps", str(steps),
                               "--format", "json", "--output", str(self.out)),
                cwd=folder, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                start_new_session=True, preexec_fn=die_with_parent)

    def wait(self) -> Path:
        code = self.process.wait()
        result = self.out / "a-count.jsonl"
        if code not in (0, 1) or not result.exists():
            raise UserError(f"ab: side {self.side.name} ({self.side.describe()}): its own `ab --count` failed "
                            f"(exit {code}): {last_line(self.log) or 'no output'} (log: {self.log})")
        return result

    def kill(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
