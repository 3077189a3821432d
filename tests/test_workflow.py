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


def _nightly_step(name_part: str) -> dict:
    steps = yaml.safe_load(WORKFLOW.read_text())["jobs"]["nightly"]["steps"]
    [step] = [s for s in steps if name_part in s.get("name", "")]
    return step


def test_the_nightly_history_step_publishes_the_steps_it_finds(tmp_path):
    """The nightly job's publishing step, run as GitHub runs it with the real sparsebench on
    stored results (the committed fixtures, one planted step): the summary names the step
    and the HTML page is written."""
    import shutil
    import sys

    step = _nightly_step("Publish the history")
    results = tmp_path / "history" / "results"
    shutil.copytree(Path(__file__).parent / "fixtures" / "history", results)
    for path in results.glob("*.jsonl"):  # recent enough for the step's 90 days
        lines = path.read_text().splitlines()
        lines[0] = lines[0].replace('"2026-11-', '"2099-11-')
        path.write_text("\n".join(lines) + "\n")
    fake = tmp_path / "venv" / "bin" / "sparsebench"
    fake.parent.mkdir(parents=True)
    root = Path(__file__).resolve().parent.parent
    fake.write_text(f'#!/bin/sh\nPYTHONPATH="{root}" exec "{sys.executable}" -m sparsebench "$@"\n')
    fake.chmod(0o755)
    path = tmp_path / "script.sh"
    path.write_text(step["run"])
    env = {"PATH": "/usr/bin:/bin", "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"), "HOME": str(tmp_path)}
    done = subprocess.run([*_github_shell(step), str(path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    summary = (tmp_path / "summary.md").read_text()
    assert "**1 step(s)**" in summary and "els-b512-sgd-cpu" in summary
    assert "data:image/png;base64," in (tmp_path / "history" / "index.html").read_text()


def test_the_nightly_job_runs_only_on_the_schedule_and_the_gate_only_on_pull_requests():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow[True] if True in workflow else workflow["on"]  # YAML 1.1 reads `on` as true
    assert "schedule" in triggers and "pull_request" in triggers
    assert workflow["jobs"]["nightly"]["if"] == "github.event_name != 'pull_request'"
    assert workflow["jobs"]["throughput"]["if"] == "github.event_name == 'pull_request'"
