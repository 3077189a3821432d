"""The hostile-input corpus (tests/hostile/cases.toml): every command, given bad suites,
bad headers, bad records, bad data lines and bad options, answers in one line with the
right exit code, never a traceback."""

import os
import shutil
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

HOSTILE = Path(__file__).parent / "hostile"
ROOT = Path(__file__).resolve().parent.parent
CASES = tomllib.loads((HOSTILE / "cases.toml").read_text())["case"]
COMMANDS = ("run", "report", "compare", "history", "ab", "bisect", "profile", "bound", "data", "serve", "env", "ops",
            "suites")
PROGRESS_STARTS = ("converting ",)


def test_the_corpus_covers_every_command():
    from sparsebench.cli import cli

    assert set(COMMANDS) == set(cli.commands), "a command was added: give it hostile cases"
    covered = {case["args"][0] for case in CASES}
    assert covered >= set(COMMANDS), set(COMMANDS) - covered
    assert {"write", "inspect", "convert"} <= {case["args"][1] for case in CASES if case["args"][0] == "data"}


@pytest.fixture
def busy_port():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_hostile_input(case, tmp_path, busy_port):
    values = {"{tmp}": str(tmp_path), "{busy_port}": str(busy_port)}
    if "copy" in case:
        values["{copy}"] = str(shutil.copy(HOSTILE / case["copy"], tmp_path / Path(case["copy"]).name))
    args = []
    for arg in case["args"]:
        for key, value in values.items():
            arg = arg.replace(key, value)
        args.append(arg)
    env = {**os.environ, "PYTHONPATH": str(ROOT), **case.get("env", {})}
    done = subprocess.run([sys.executable, "-m", "sparsebench", *args], capture_output=True, text=True, env=env,
                          cwd=HOSTILE, timeout=600, stdin=subprocess.DEVNULL)
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output
    assert done.returncode == case["exit"], output
    expected = case["says"] if isinstance(case["says"], list) else [case["says"]]
    for key, value in values.items():
        expected = [text.replace(key, value) for text in expected]
    if case["exit"] == 2:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        if lines and lines[0].startswith("Usage: "):
            lines = lines[1:]  # click's usage line may stand above the error
        if lines and lines[0].startswith(PROGRESS_STARTS) and lines[0].endswith(" ..."):
            lines = lines[1:]  # so may the line that says a long step began (`converting SRC to DST ...`)
        assert len(lines) == 1 and lines[0].startswith("sparsebench: error: "), done.stderr
        output = lines[0]
    for text in expected:
        assert text in output, output
