"""The package layout keeps its promises: the parent side never imports TensorFlow, and
each folder imports only the layers below it.

    errors, results, stats, machine, lifetime, modules, load, tables: shared formats and facts (bottom)
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

BOTTOM = {"errors", "results", "record", "stats", "machine", "lifetime", "modules", "load", "tables"}
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


# Inside train/: rooms stacked worker > ps/ > cell.py > model/ > inputs/, measure/, custom_ops/
# > tf_import.py. A room imports only itself and rooms of a lower rank; inputs/, measure/ and
# custom_ops/ are siblings and do not import each other.
TRAIN_RANKS = {"worker": 4, "ps": 3, "cell": 2, "model": 1, "inputs": 0, "measure": 0, "custom_ops": 0,
               "tf_import": -1}


def train_room(module: str) -> str | None:
    """'sparsebench.train.model.kernels' -> 'model'; 'sparsebench.train.cell' -> 'cell'."""
    parts = module.split(".")
    if len(parts) < 3 or parts[1] != "train":
        return None
    return parts[2]


def test_the_rooms_of_train_import_only_the_rooms_below_them():
    violations = []
    rooms = {train_room(module_name(p)) for p in all_modules()} - {None}
    assert rooms == set(TRAIN_RANKS), f"a room without a rank: {rooms ^ set(TRAIN_RANKS)}"
    for path in all_modules():
        source = train_room(module_name(path))
        if source is None:
            continue
        for line, target in sparsebench_imports(path):
            room = train_room(target)
            if room is None or room == source:
                continue
            if TRAIN_RANKS[room] >= TRAIN_RANKS[source]:
                violations.append(f"{path.relative_to(ROOT)}:{line}: train/{source} imports {target} (train/{room})")
    assert not violations, "\n".join(violations)


def import_graph() -> dict[str, set[str]]:
    """Module -> the sparsebench modules it imports (at module level or inside functions)."""
    graph = {}
    for path in all_modules():
        graph[module_name(path)] = {target for _, target in sparsebench_imports(path) if target != "sparsebench"}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (an import cycle)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle():
    assert cycles(import_graph()) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check itself


def test_the_installed_package_holds_every_module_of_the_checkout():
    """A non-editable install (CI's) must ship every module: the tests import the checkout,
    so a subpackage left out of the wheel would otherwise pass unnoticed."""
    from importlib import metadata

    # The installed copy is the one with a RECORD: building the wheel in CI leaves a
    # sparsebench.egg-info in the checkout, which sits first on sys.path and lists source paths.
    installed_dists = [d for d in metadata.distributions(name="sparsebench") if d.read_text("RECORD")]
    if not installed_dists:
        pytest.skip("sparsebench is not installed (the tests run on the checkout alone)")
    dist = installed_dists[0]
    if (dist.read_text("direct_url.json") or "").find('"editable": true') >= 0:
        pytest.skip("an editable install ships the checkout itself")
    installed = {str(f) for f in dist.files or []}
    missing = [str(p.relative_to(ROOT)) for p in all_modules() if str(p.relative_to(ROOT)) not in installed]
    missing += [f"suites/{p.name}" for p in (ROOT / "suites").glob("*.toml")
                if f"sparsebench/suites/{p.name}" not in installed]
    missing += [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.cc") if str(p.relative_to(ROOT)) not in installed]
    assert not missing, f"not in the installed package: {missing}"


def architecture() -> str:
    """Files per folder and the arrows between folders and rooms (what a review reads)."""
    graph = import_graph()
    def place(module):
        room = train_room(module)
        return f"train/{room}" if room else layer_of(module)
    files: dict[str, int] = {}
    for module in graph:
        files[place(module)] = files.get(place(module), 0) + 1
    arrows = sorted({(place(a), place(b)) for a, targets in graph.items() for b in targets if place(a) != place(b)})
    lines = [f"{name}: {count} files" for name, count in sorted(files.items())]
    lines += [f"{a} -> {b}" for a, b in arrows]
    return "\n".join(lines)


if __name__ == "__main__":
    print(architecture())


def module_starts_by_dash_m(path: Path) -> list[int]:
    """Lines of `path` that start a sparsebench module as `[python, "-m", "sparsebench..."]`
    (a list or tuple literal), which imports a `sparsebench/` found in the current directory."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.List, ast.Tuple)):
            words = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
            for i, word in enumerate(words[:-1]):
                if word == "-m" and isinstance(words[i + 1], str) and words[i + 1].startswith("sparsebench"):
                    lines.append(node.lineno)
    return lines


def test_every_module_start_goes_through_module_command(tmp_path):
    """`python -m sparsebench...` run in a checkout (or any folder holding a `sparsebench/`)
    imports that folder's code: `data` and `serve` did (issue 36). Every start goes through
    `modules.module_command`; the check is shown to catch the old form."""
    found = {str(p.relative_to(ROOT)): module_starts_by_dash_m(p) for p in all_modules()}
    assert not {name: lines for name, lines in found.items() if lines}
    planted = tmp_path / "planted.py"
    planted.write_text('import os, sys\nos.execv(sys.executable, [sys.executable, "-m", "sparsebench.train.x"])\n')
    assert module_starts_by_dash_m(planted) == [2]


def test_data_from_a_folder_holding_another_sparsebench_runs_the_installed_one(tmp_path):
    """The console script run where a `sparsebench/` package lies (a checkout of another
    commit): `data inspect`'s tool is the installed one, never that folder's."""
    fake = tmp_path / "sparsebench" / "train" / "inputs"
    fake.mkdir(parents=True)
    for folder in (tmp_path / "sparsebench", tmp_path / "sparsebench" / "train", fake):
        (folder / "__init__.py").write_text("")
    (fake / "datatool.py").write_text("print('WRONG')\n")
    script = Path(sys.executable).parent / "sparsebench"
    if not script.exists():
        pytest.skip("no sparsebench console script beside this interpreter")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(script), "data", "inspect", str(tmp_path / "absent.tfrecord"), "--format", "tfrecord"],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert "WRONG" not in done.stdout
    assert done.returncode == 2 and "absent.tfrecord" in done.stderr, done.stdout + done.stderr


def test_tensorflow_is_imported_without_keras_and_keras_still_loads_on_demand():
    """Workers, cluster tasks, the data tool and the op build import TensorFlow through
    `train.tf_import`: TensorFlow's own eager Keras import (1-1.6 s of every start) is left
    out, and a later `import keras` (a user's variant) still works."""
    code = ("import sys, time; from sparsebench.train.tf_import import import_tensorflow; tf = import_tensorflow(); "
            "print(sorted(m for m in sys.modules if m == 'keras' or m.startswith('keras.'))); "
            "print(float(tf.reduce_sum(tf.constant([1.0, 2.0])))); import keras; print(keras.__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:3] == ["[]", "3.0", "keras"], done.stdout
    for path in ("train/worker.py", "train/ps/cluster_task.py", "train/inputs/datatool.py", "train/custom_ops/__main__.py"):
        assert "import_tensorflow()" in (PACKAGE / path).read_text(), path


# -- the CLI's help and the README say the same, and nothing there ages ---------------------
def _helps():
    """(command path, help text at 80 columns) of every command and group."""
    import click

    from sparsebench.cli import cli

    found = []

    def walk(command, path):
        context = click.Context(command, info_name=" ".join(path), terminal_width=80, max_content_width=80)
        found.append((" ".join(path), command.get_help(context)))
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*path, name])

    walk(cli, ["sparsebench"])
    return found


def test_no_command_summary_is_cut_at_80_columns():
    """6 of 12 summaries in `sparsebench --help` ended in "..." (cut by click)."""
    for path, text in _helps():
        listed = text.split("Commands:\n")[1].split("\n\n")[0] if "Commands:\n" in text else ""
        assert "..." not in listed, f"{path}: a cut summary:\n{listed}"


def test_help_texts_carry_no_measured_figure():
    """`--help` said "about 75 s", "20-60 s", "3.9%": measurements that age. Figures belong
    to the README's dated measurements, the tool's output to what it just measured."""
    import re

    aging = re.compile(r"\d+(?:\.\d+)?\s?%|about \d+ ?s\b|\d+-\d+ ?s\b|\d+(?:\.\d+)?x\b")
    for path, text in _helps():
        assert not aging.search(text), f"{path}: {aging.search(text).group()!r} in its help"


def test_the_readme_lists_every_command_axis_and_the_exit_codes_the_cli_has():
    """The README's commands table lacked `bisect`, its axis list `text_parser`, its exit
    codes every command but `run`: the README now quotes the CLI's epilog, and the table and
    axis list are checked against the CLI and the suite parser."""
    import re

    from sparsebench.cli import EPILOG, cli
    from sparsebench.plan.suite import AXES

    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Commands")[1].split("\n\n")[1]
    listed = {m.group(1) for m in re.finditer(r"^\| `sparsebench (\w+)", table, re.M)}
    assert listed == set(cli.commands), (listed ^ set(cli.commands))
    suites = readme.split("## Suites")[1].split("expanded by")[0]
    axes = set(re.findall(r"`(\w+)`", suites.split("[matrix]` of axes")[1]))
    assert axes == set(AXES), axes ^ set(AXES)
    for line in EPILOG.splitlines():
        if line.strip() and line.strip() != "\b":
            assert line in readme, f"README lacks the --help line {line!r}"
    assert "130  interrupted" in EPILOG and "Requires Linux" in EPILOG
