"""The package layout keeps its promises: the parent side never imports TensorFlow, and
each folder imports only the layers below it.

    errors, results, stats, machine, lifetime   shared formats and facts (bottom)
    plan/      what to run               -> bottom
    execute/   the parent process        -> plan, bottom
    train/     the worker (TensorFlow)   -> plan, bottom
    analyze/   reading results           -> plan, bottom
    cli        the command line          -> everything but train/
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sparsebench"
FIXTURES = Path(__file__).parent / "fixtures"

BOTTOM = {"errors", "results", "stats", "machine", "lifetime"}
ALLOWED = {
    "bottom": {"bottom"},
    "plan": {"bottom", "plan"},
    "execute": {"bottom", "plan", "execute"},
    "train": {"bottom", "plan", "train"},
    "analyze": {"bottom", "plan", "analyze"},
    "top": {"bottom", "plan", "execute", "analyze", "top"},
}

# Runs in a fresh interpreter: import every module outside train/, run the commands that
# need no worker, and report whether TensorFlow got into sys.modules (and from where).
PROBE = r"""
import importlib, json, pkgutil, sys, traceback

first_import = []

class Watch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow" and not first_import:
            first_import.append("".join(traceback.format_stack(limit=15)))
        return None

sys.meta_path.insert(0, Watch())
import sparsebench

modules = [m.name for m in pkgutil.walk_packages(sparsebench.__path__, "sparsebench.")
           if not m.name.startswith("sparsebench.train") and m.name != "sparsebench.__main__"]
for name in modules:
    importlib.import_module(name)

from sparsebench.cli import main
codes = {}
for argv in json.loads(sys.argv[1]):
    try:
        main(argv)
    except SystemExit as exc:
        codes[" ".join(argv)] = exc.code
print(json.dumps({"modules": modules, "codes": codes, "tensorflow": "tensorflow" in sys.modules,
                  "first_import": first_import[0] if first_import else None}))
"""


def test_the_parent_side_never_imports_tensorflow(tmp_path):
    commands = [
        ["--help"],
        ["suites"],
        ["run", "--suite", "smoke", "--dry-run"],
        ["report", str(FIXTURES / "talk.jsonl"), "--format", "html", "--output", str(tmp_path / "r.html")],
        ["report", str(FIXTURES / "threads.jsonl"), "--plots", str(tmp_path / "plots")],
        ["compare", str(FIXTURES / "talk.jsonl"), str(FIXTURES / "talk.jsonl"), "--format", "json"],
        ["env", "--json"],  # TensorFlow's facts come from a worker process, not from here
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(commands)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["tensorflow"] is False, f"TensorFlow was imported here:\n{result['first_import']}"
    assert result["first_import"] is None, f"an import of TensorFlow was attempted here:\n{result['first_import']}"
    imported = set(result["modules"])
    assert {"sparsebench.cli", "sparsebench.plan.suite", "sparsebench.execute.runner",
            "sparsebench.execute.orchestrator", "sparsebench.analyze.report", "sparsebench.analyze.profile",
            "sparsebench.results", "sparsebench.stats"} <= imported
    assert all(code == 0 for code in result["codes"].values()), result["codes"]
    assert len(result["codes"]) == len(commands)


FOLDERS = {"plan", "execute", "train", "analyze"}


def layer_of(module: str) -> str:
    """'sparsebench.plan.cell' -> 'plan'; 'sparsebench.results' -> 'bottom'; 'sparsebench.cli' -> 'top'."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in FOLDERS:
        return parts[1]
    return "bottom" if len(parts) > 1 and parts[1] in BOTTOM else "top"


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def is_module(name: str) -> bool:
    relative = Path(*name.split("."))
    return (ROOT / relative.with_suffix(".py")).exists() or (ROOT / relative / "__init__.py").exists()


def sparsebench_imports(path: Path) -> list[tuple[int, str]]:
    """Every sparsebench module `path` imports (relative imports resolved), with line numbers."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:  # `from . import runner` imports a module, `from .x import f` a name
                target = f"{source}.{alias.name}"
                found.append((node.lineno, target if is_module(target) else source))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return [(line, target) for line, target in found if target.split(".")[0] == "sparsebench"]


def all_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_folder_imports_only_the_layers_below_it():
    violations = []
    for path in all_modules():
        source_layer = layer_of(module_name(path))
        for line, target in sparsebench_imports(path):
            if target == "sparsebench":  # the package itself holds only __version__
                continue
            if layer_of(target) not in ALLOWED[source_layer]:
                violations.append(f"{path.relative_to(ROOT)}:{line}: {source_layer} imports {target} ({layer_of(target)})")
    assert not violations, "\n".join(violations)


def test_the_layer_check_would_catch_a_violation(tmp_path):
    """The checker itself: an analyze module importing the worker is found."""
    fake = PACKAGE / "analyze" / "_layout_probe_tmp.py"
    fake.write_text("from ..train import worker\n")
    try:
        with pytest.raises(AssertionError, match="analyze imports sparsebench.train.worker"):
            test_every_folder_imports_only_the_layers_below_it()
    finally:
        fake.unlink()


def test_nothing_points_outside_the_repository():
    """Docs and docstrings say things in the project's own words, not by reference to files
    a user of the package never has."""
    offenders = []
    for path in [*all_modules(), ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("suites/*.toml"),
                 *ROOT.glob("examples/*")]:
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if "DESIGN.md" in line or "../shared" in line:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
