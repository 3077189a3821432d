"""`sparsebench ab`: two sides measured alternately on one machine, in one command.

Why: two stored runs made minutes apart differ by whatever the shared machine did in
between (tens of percent here), and nothing in either run can tell that drift from a
change of the code. Measuring both sides alternately, round after round, makes the drift
hit both alike, and pairing each round's A with its B cancels it ("duet" benchmarking;
asv's `--interleave-rounds`). The order alternates, A B, B A, A B, ..., so a trend
favours neither side.

A side is an interpreter (`--a-python`: another virtualenv, with another TensorFlow or
another sparsebench) and settings (`--a-set AXIS=V`). Each round starts a fresh worker
process per side (per process group of the suite). Two granularities:

- `cell` (the default): both sides' workers are alive at once and take turns cell by
  cell (A runs cell 1, B runs cell 1, B runs cell 2, A runs cell 2, ...), so the two
  measurements of a pair are seconds apart. On a shared VM whose speed changes for tens
  of seconds at a time, this is what makes the pairs agree. Both interpreters must speak
  this sparsebench's worker protocol (`WORKER_PROTOCOL`).
- `suite`: each side and round is one `PYTHON -m sparsebench run` of the same suite file,
  so any version of sparsebench on either side works; a pair is a whole suite apart.

Either way each side's records (one per cell and round, the round as the process) go to
one results file (`a.jsonl`, `b.jsonl`). Deciding which cells changed is
`sparsebench.analyze.paired`'s job.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from ..modules import module_command
from .. import WORKER_PROTOCOL
from ..errors import UserError
from ..lifetime import die_with_parent
from ..plan.cell import Cell
from ..plan.suite import load_suite
from ..results import ResultsWriter, read_results
from .custom_op import needs_custom_op, prebuild, skip_reason
from .env import fingerprint
from .orchestrator import Orchestrator, last_line
from .runner import run_header

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
    sets = [arg for assignment in [*overrides, *side.overrides] for arg in ("--set", assignment)]
    return [side.python, "-m", "sparsebench", "run", "--suite", str(suite_file), *sets, "--quiet", "--output",
            str(output)]


def run_ab(*, suite_arg: str, overrides: list[str], a: Side, b: Side, rounds: int, folder: Path,
           say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> ABRun:
    """Run every (round, side) in ABBA order; return where each side's results are."""
    if rounds < 2:
        raise UserError(f"--rounds: a paired comparison needs at least 2 rounds, got {rounds}")
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
            done = subprocess.run(_side_command(side, suite_file, overrides, output), stdout=fh,
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
    if not found or not os.path.isfile(found) or not os.access(found, os.X_OK):
        raise UserError(f"{path}: no such Python interpreter (give the path to a virtualenv's bin/python)")
    try:
        done = subprocess.run([found, "-m", "sparsebench", "--version"], capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
    except (OSError, subprocess.SubprocessError) as exc:
        raise UserError(f"{path}: cannot run it as a Python interpreter: {exc}") from None
    if done.returncode != 0 or not done.stdout.startswith("sparsebench"):
        said = (done.stderr.strip().splitlines() or done.stdout.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"{path}: `{path} -m sparsebench --version` failed (exit {done.returncode}: {said[:160]}); "
                        f"install sparsebench into that environment")
    return found


# -- cell-by-cell interleaving -----------------------------------------------------------
class Turnstile:
    """Lets (cell, side) pairs through one at a time, in a fixed order, across threads."""

    def __init__(self, order: list[tuple[int, str]]):
        self.order = order
        self.position = 0
        self.aborted = False
        self._cv = threading.Condition()

    def wait(self, index: int, side: str) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self.aborted or self.order[self.position] == (index, side))
            if self.aborted:
                raise KeyboardInterrupt  # the run is being torn down

    def done(self, index: int, side: str) -> None:
        with self._cv:
            if self.position < len(self.order) and self.order[self.position] == (index, side):
                self.position += 1
            self._cv.notify_all()

    def abort(self) -> None:
        with self._cv:
            self.aborted = True
            self._cv.notify_all()


def _meet(barrier: threading.Barrier, turnstile: "Turnstile", met: set[str], side: str,
          timeout_s: float = 300.0) -> None:
    """A side's first worker of a round waits until the other side's has started too (a
    broken barrier, a timeout or an aborted round: go on)."""
    if turnstile.aborted or side in met:
        return
    met.add(side)
    try:
        barrier.wait(timeout=timeout_s)
    except threading.BrokenBarrierError:
        pass


def cell_order(cells: int, round_number: int) -> list[tuple[int, str]]:
    """(cell, side) in the order one round runs them: A B, B A, ... cell by cell, the first
    cell of a round starting with A in odd rounds and with B in even ones."""
    order = []
    for i in range(cells):
        first_a = (i + round_number) % 2 == 1
        order += [(i, side) for side in (SIDES if first_a else SIDES[::-1])]
    return order


def worker_protocol(python: str) -> tuple[str | None, set[str]]:
    """The worker protocol `python`'s sparsebench speaks and the features it names (None,
    empty: it does not answer)."""
    try:
        done = subprocess.run(module_command(python, "sparsebench.train.worker", "--protocol"), capture_output=True,
                              text=True, timeout=120, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
                              preexec_fn=die_with_parent)
    except (OSError, subprocess.SubprocessError):
        return None, set()
    lines = done.stdout.strip().splitlines() if done.returncode == 0 else []
    if not lines:
        return None, set()
    features = {word for line in lines[1:] if line.startswith("features:") for word in line.split(":", 1)[1].split()}
    return lines[0].strip(), features


def speaks_protocol(python: str) -> bool:
    """Whether `python`'s sparsebench runs workers the way the cell-by-cell mode needs."""
    return worker_protocol(python)[0] == str(WORKER_PROTOCOL)


def side_cells(suite_file: Path, overrides: list[str], sides: dict[str, Side], *, ab: dict, isolation: str | None = None,
               keep: Callable[[Cell], bool] = lambda cell: True) -> tuple[dict[str, list[Cell]], dict[str, dict]]:
    """Each side's cells (the suite file with the shared and the side's own overrides) and
    its results header, the fused op prebuilt for the side's interpreter (one line, before
    anything is measured, if it cannot be)."""
    cells, metas = {}, {}
    for name, side in sides.items():
        suite = load_suite(str(suite_file))
        for assignment in [*overrides, *side.overrides]:
            suite.override(assignment)
        cells[name] = [c for c in suite.cells() if keep(c)]
        metas[name] = run_header(suite, str(suite_file), [*overrides, *side.overrides], isolation or suite.isolation,
                                 len(cells[name]), ab={"side": name, "python": side.python,
                                                       "overrides": side.overrides, **ab})
        metas[name]["custom_op"] = prebuild(cells[name], side.python)
        reason = skip_reason(metas[name]["custom_op"])
        if reason and any(needs_custom_op(c) for c in cells[name]):
            raise UserError(f"ab: side {name} ({side.describe()}): {reason}; leave fused_custom_op out with "
                            f"--set variant=...")
    return cells, metas


def run_interleaved(*, suite_arg: str, overrides: list[str], a: Side, b: Side, rounds: int, folder: Path,
                    say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> ABRun:
    """Every round: a fresh worker per side, taking turns cell by cell (see the module)."""
    if rounds < 2:
        raise UserError(f"--rounds: a paired comparison needs at least 2 rounds, got {rounds}")
    suite_file = prepare(suite_arg, overrides, a, b, folder)
    sides = {"A": a, "B": b}
    ready = {name: "ready" in worker_protocol(side.python)[1] for name, side in sides.items()}
    writers: dict[str, ResultsWriter] = {}
    cells, metas = side_cells(suite_file, overrides, sides, ab={"rounds": rounds, "interleave": "cell"})
    cells = {name: [replace(c, measure=replace(c.measure, processes=1)) for c in side] for name, side in cells.items()}
    for name, side in sides.items():
        writers[name] = ResultsWriter(folder / f"{name.lower()}.jsonl", lambda side=side, meta=metas[name]:
                                      {"run": meta, "environment": fingerprint(side.python)})
    run = ABRun(folder, suite_file, rounds, {name: w.path for name, w in writers.items()})
    started = time.monotonic()
    try:
        for r in range(1, rounds + 1):
            t0 = time.monotonic()
            turnstile = Turnstile(cell_order(len(cells["A"]), r))
            # both sides' workers start together; no cell is timed until both have (a worker
            # importing TensorFlow takes a core the other side's first cell would miss)
            both_started = threading.Barrier(len(SIDES))  # (an older worker that says nothing: at its release)
            met: set[str] = set()  # only each side's first worker of the round waits (a crash starts another)
            counts = {name: Counter() for name in SIDES}
            orchestrators, threads, errors = {}, [], []
            for name in SIDES:
                index_of = {id(c): i for i, c in enumerate(cells[name])}

                def record(outcome, name=name, index_of=index_of):
                    writers[name].append(outcome.record)
                    counts[name][outcome.record.status] += 1
                    turnstile.done(index_of[id(outcome.cell)], name)

                def gate(cell, name=name, index_of=index_of):
                    turnstile.wait(index_of[id(cell)], name)
                    run.order.append(name)

                orchestrators[name] = Orchestrator(record=record, isolation=load_suite(str(suite_file)).isolation,
                                                   python=sides[name].python, gate=gate, announces_ready=ready[name],
                                                   on_ready=lambda name=name: _meet(both_started, turnstile, met, name))

                def work(name=name):
                    try:
                        orchestrators[name].run(cells[name], round=r)
                    except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                        errors.append(exc)
                        turnstile.abort()

                threads.append(threading.Thread(target=work, name=f"ab-{name}", daemon=True))
            for thread in threads:
                thread.start()
            try:
                while any(thread.is_alive() for thread in threads):
                    for thread in threads:
                        thread.join(timeout=0.2)
            except KeyboardInterrupt:
                turnstile.abort()
                for orchestrator in orchestrators.values():
                    orchestrator.kill()
                raise
            if errors and not isinstance(errors[0], KeyboardInterrupt):
                raise errors[0]
            summary = "; ".join(f"{name}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts[name].items()))
                                for name in SIDES)
            say(f"round {r}/{rounds}: {summary} ({time.monotonic() - t0:.0f} s)")
    finally:
        for writer in writers.values():
            writer.close()
    run.seconds = time.monotonic() - started
    return run


# -- counted work (ab --count) ---------------------------------------------------------------
# Counted cells run on one thread each (the counts then repeat to a few hundredths of a
# percent), every cell of a side in one worker under valgrind, both sides at once.
COUNT_OVERRIDES = ["intra_op_threads=1", "inter_op_threads=1", "processes=1"]
COUNT_MARCH = ("SPARSEBENCH_OPS_MARCH", "x86-64-v3")  # train.custom_ops.build reads it


def run_counted(*, suite_arg: str, overrides: list[str], a: Side, b: Side, folder: Path, steps: int,
                say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> ABRun:
    """Count every cell of both sides under callgrind, the two sides concurrently."""
    from ..plan.job import CountRequest
    from .counting import unavailable

    if steps < 1:
        raise UserError(f"--count-steps: must be >= 1, got {steps}")
    problem = unavailable()
    if problem:
        raise UserError(f"ab --count: counting needs valgrind's callgrind, but {problem}")
    suite_file = prepare(suite_arg, [*overrides, *COUNT_OVERRIDES], a, b, folder)
    # valgrind cannot execute AVX-512: the fused op is built for AVX2 here and in the workers
    os.environ[COUNT_MARCH[0]] = COUNT_MARCH[1]
    sides = {"A": a, "B": b}
    writers = {}
    cells, metas = side_cells(suite_file, [*overrides, *COUNT_OVERRIDES], sides, ab={"count_steps": steps},
                              isolation="env", keep=lambda c: c.workers == 1 and c.distribution.is_local)
    if len(cells["A"]) != len(cells["B"]) or not cells["A"]:
        raise UserError(f"ab --count: {len(cells['A'])} and {len(cells['B'])} cells to count (Hogwild and "
                        f"parameter-server cells are timed only)")
    for name, side in sides.items():
        writers[name] = ResultsWriter(folder / f"{name.lower()}-count.jsonl", lambda side=side, meta=metas[name]:
                                      {"run": meta, "environment": fingerprint(side.python)})
    run = ABRun(folder, suite_file, 1, {name: w.path for name, w in writers.items()})
    started = time.monotonic()
    errors: list[BaseException] = []
    orchestrators = {}

    def work(name: str) -> None:
        dumps = folder / f"callgrind-{name.lower()}"
        dumps.mkdir(exist_ok=True)

        def record(outcome, name=name):
            writers[name].append(outcome.record)
            say(f"counted side {name}: {outcome.cell.label}: {outcome.record.status}"
                + (f" ({outcome.record.reason})" if outcome.record.reason else ""))

        orchestrators[name] = Orchestrator(record=record, isolation="env", python=sides[name].python,
                                           count=CountRequest(steps, str(dumps.resolve())))
        try:
            orchestrators[name].run(cells[name], round=1)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(name,), name=f"count-{name}", daemon=True) for name in SIDES]
    try:
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            for thread in threads:
                thread.join(timeout=0.2)
    except KeyboardInterrupt:
        for orchestrator in orchestrators.values():
            orchestrator.kill()
        raise
    finally:
        for writer in writers.values():
            writer.close()
    if errors:
        raise errors[0]
    run.order = list(SIDES)
    run.seconds = time.monotonic() - started
    return run
