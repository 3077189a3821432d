"""The shipped GitHub Actions workflow (`examples/github-actions-benchmark.yml`) must fail the
job when `sparsebench ab` exits 1: each gate step's script is run the way GitHub's runner
runs it, against a fake `sparsebench` that exits with a chosen code."""

import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

WORKFLOW = Path(__file__).resolve().parent.parent / "examples" / "github-actions-benchmark.yml"


def _gate_steps() -> list[dict]:
    steps = yaml.safe_load(WORKFLOW.read_text())["jobs"]["throughput"]["steps"]
    return [step for step in steps if "sparsebench ab" in step.get("run", "")]


def _github_shell(step: dict) -> list[str]:
    """The command GitHub's runner uses for a `run` step on Linux: `shell: bash` named
    explicitly is `bash --noprofile --norc -eo pipefail {0}`; no shell named is `bash -e {0}`
    (no pipefail: a pipe's status is its last command's)."""
    shell = step.get("shell")
    if shell == "bash":
        return ["bash", "--noprofile", "--norc", "-eo", "pipefail"]
    if shell is None:
        return ["bash", "-e"]
    raise AssertionError(f"step {step['name']!r}: shell {shell!r} is not one this test knows")


def _run_step(tmp_path: Path, step: dict, script: str, exit_code: int, shell: list[str]) -> int:
    fake = tmp_path / "head-venv" / "bin" / "sparsebench"
    fake.parent.mkdir(parents=True, exist_ok=True)
    fake.write_text(f"#!/bin/sh\necho '| cell | verdict |'\necho 'REGRESSED' >&2\nexit {exit_code}\n")
    fake.chmod(0o755)
    path = tmp_path / "script.sh"
    path.write_text(script)
    env = {"PATH": "/usr/bin:/bin", "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md")}
    return subprocess.run([*shell, str(path)], cwd=tmp_path, env=env, capture_output=True).returncode


def test_the_workflow_has_both_gate_steps():
    names = [step["name"] for step in _gate_steps()]
    assert len(names) == 2 and any("Counted" in n for n in names) and any("Time" in n for n in names)


@pytest.mark.parametrize("index", [0, 1])
def test_a_gate_step_fails_when_ab_exits_1_and_passes_when_it_exits_0(tmp_path, index):
    step = _gate_steps()[index]
    shell = _github_shell(step)
    assert _run_step(tmp_path, step, step["run"], 1, shell) != 0, f"{step['name']!r} passes although ab failed"
    assert _run_step(tmp_path, step, step["run"], 0, shell) == 0, f"{step['name']!r} fails although ab passed"
    assert "| cell | verdict |" in (tmp_path / "summary.md").read_text()  # the pipe still feeds the summary


def test_the_harness_sees_a_lost_exit_code(tmp_path):
    """Control: the same step under GitHub's default shell and without `set -o pipefail`
    (the bug this file guards against) passes although ab failed, so the test above can
    tell the two apart."""
    step = _gate_steps()[1]
    script = step["run"].replace("set -o pipefail", "")
    assert _run_step(tmp_path, step, script, 1, ["bash", "-e"]) == 0
