"""Commits of a sparsebench checkout: finding them, and installing one into a virtualenv of
its own, for the self-gate (`.ci/self_gate.py`) and `sparsebench bisect`.

A commit is installed from `git archive` (its tree as committed, nothing of the work tree)
into `<cache>/<commit>-<pins>/venv`, with pip constrained to the versions another
interpreter has installed (`installed_versions`): both sides of a comparison then run the
same TensorFlow, Keras and NumPy, whatever PyPI released between the two installs. A venv
is reused only when its install finished (a marker written last).

The gate's reference rules live here too: a reference must resolve to a commit of this
checkout, lie on HEAD's first-parent history, and be at most `MAX_REFERENCE_AGE` commits
behind it; each broken rule is one line that fails the gate.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..lifetime import die_with_parent

MAX_REFERENCE_AGE = 50  # first-parent commits between the gate's reference and HEAD
NOT_PINNED = {"sparsebench", "pip", "setuptools", "wheel"}  # the package itself and the installers
INSTALL_TIMEOUT_S = 1800.0


def git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        return subprocess.CompletedProcess(["git", *args], 128, "", str(exc))


def resolve(repo: Path, name: str) -> str | None:
    """The full id of commit `name` in `repo`, or None (not there: a shallow clone, a typo).
    Only a hex object name or a ref name is looked up, never an option."""
    if not name or name.startswith("-"):
        return None
    found = git(repo, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{name}^{{commit}}")
    return found.stdout.strip() if found.returncode == 0 and found.stdout.strip() else None


def first_parents(repo: Path, head: str = "HEAD", limit: int | None = None) -> list[str]:
    """HEAD and its first parents, newest first."""
    args = ["rev-list", "--first-parent", *([f"--max-count={limit}"] if limit else []), "--end-of-options", head]
    found = git(repo, *args)
    return found.stdout.split() if found.returncode == 0 else []


def check_reference(repo: Path, name: str, source: str, max_age: int = MAX_REFERENCE_AGE) -> str:
    """The reference's full id, or a UserError that says in one line which rule it breaks."""
    commit = resolve(repo, name)
    if commit is None:
        shallow = git(repo, "rev-parse", "--is-shallow-repository").stdout.strip() == "true"
        hint = ("this clone is shallow: fetch its history (git fetch --unshallow)" if shallow
                else "is it a commit of this repository?")
        raise UserError(f"the gate's reference {name!r} ({source}) is not a commit of this checkout: {hint}")
    chain = first_parents(repo)
    if commit not in chain:
        raise UserError(f"the gate's reference {commit[:12]} ({source}) is not on HEAD's first-parent history: "
                        f"the gate compares a change with the main it was built on")
    age = chain.index(commit)
    if age > max_age:
        raise UserError(f"the gate's reference {commit[:12]} ({source}) is {age} commits behind HEAD, more than "
                        f"{max_age}: move it to the main this work started from")
    return commit


def messages(repo: Path, base: str, head: str = "HEAD") -> list[tuple[str, str]]:
    """(commit, message) of every commit in base..head, oldest first."""
    found = git(repo, "log", "--reverse", "--format=%H%x00%B%x01", f"{base}..{head}")
    out = []
    for entry in found.stdout.split("\x01"):
        commit, _, message = entry.strip("\n").partition("\x00")
        if commit:
            out.append((commit.strip(), message))
    return out


def changed_paths(repo: Path, a: str, b: str) -> list[str] | None:
    """The paths that differ between two commits (None: git could not say)."""
    found = git(repo, "diff", "--name-only", a, b)
    return found.stdout.split() if found.returncode == 0 else None


# -- installs --------------------------------------------------------------------------------
VERSIONS_SCRIPT = ("import importlib.metadata as m, json; "
                   "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions() if d.metadata['Name']}))")


def installed_versions(python: str) -> dict[str, str]:
    """Every distribution `python` has installed, name -> version."""
    done = subprocess.run([python, "-c", VERSIONS_SCRIPT], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
    if done.returncode != 0:
        raise UserError(f"{python}: cannot list its installed packages: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def pins(versions: dict[str, str]) -> str:
    """A pip constraints file that holds every third-party version of `versions`."""
    lines = sorted(f"{name}=={version}" for name, version in versions.items()
                   if name.lower().replace("_", "-") not in NOT_PINNED)
    return "\n".join(lines) + "\n"


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sparsebench" / "commits"


def install_commit(repo: Path, commit: str, *, constraints: str = "", root: Path | None = None,
                   say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> str:
    """`commit` of `repo` installed into a venv of its own (reused when already complete);
    its python. A commit that cannot be installed is a UserError naming it and pip's last
    line."""
    pinned = hashlib.sha256(constraints.encode()).hexdigest()[:12]
    folder = (root or cache_root()) / f"{commit[:12]}-{pinned}"
    python = folder / "venv" / "bin" / "python"
    done_marker = folder / "installed"
    if done_marker.exists() and python.exists():
        say(f"install {commit[:12]}: reusing {folder}")
        return str(python)
    shutil.rmtree(folder, ignore_errors=True)
    source = folder / "src"
    source.mkdir(parents=True)
    log = folder / "install.log"
    archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=repo, capture_output=True)
    if archive.returncode != 0:
        raise UserError(f"install {commit[:12]}: git archive failed: {archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive.stdout, check=True)
    (folder / "constraints.txt").write_text(constraints)
    say(f"install {commit[:12]}: into {folder / 'venv'}" + (" (versions pinned to the other side's)" if constraints else ""))
    steps = [[sys.executable, "-m", "venv", str(folder / "venv")],
             [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
              *(["--constraint", str(folder / "constraints.txt")] if constraints else []), str(source)]]
    with open(log, "w") as fh:
        for step in steps:
            try:
                ran = subprocess.run(step, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     timeout=INSTALL_TIMEOUT_S, preexec_fn=die_with_parent)
            except subprocess.TimeoutExpired:
                raise UserError(f"install {commit[:12]}: {step[2]} took over {INSTALL_TIMEOUT_S:.0f} s (log: {log})") \
                    from None
            if ran.returncode != 0:
                fh.flush()
                last = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:] or ["?"]
                raise UserError(f"install {commit[:12]}: {' '.join(step[2:4])} failed: {last[0][:200]} (log: {log})")
    done_marker.write_text(commit + "\n")
    return str(python)
