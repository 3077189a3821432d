"""Suites: TOML files that expand into a matrix of cells.

A suite is data, never code. Layout:

    name = "smoke"                 # optional, defaults to the file name
    description = "..."
    isolation = "cell"             # "cell": a fresh process per cell (default);
                                   # "env": cells with identical process settings share one
    [data]    ...DataSpec fields   (feature_bits, mean_active, ...)
    [model]   ...ModelSpec fields  (out_dim, hidden_units, learning_rate, ...)
    [measure] ...MeasureSpec fields (warmup_steps, windows, seconds_per_window, ...)
    [matrix]  axis = [values]      cartesian product, axes listed in AXES
    [[exclude]] axis = value|[values], ...   drop cells matching every listed axis
    [[include]] axis = value|[values], ...   add cells (unlisted axes take the matrix's values)

Every knob is set in one place. A model knob that is also an axis (`variant`,
`optimizer`, `shards`, `learning_rate`, ...) may be a single value in `[model]` or a list
in `[matrix]`, never both (an error names both keys). An axis set nowhere takes the
spec's default (`ModelSpec`, `Threads`; `batch_size` defaults to 256). `--set` replaces a
knob wherever the suite set it (`--set optimizer=ftrl` and `--set model.optimizer=ftrl`
are the same), and `--set seconds_per_window=none` unsets a setting that accepts none.

Settings that do not apply to a variant collapse rather than making every suite list
them: `shards` for a variant that is not partitioned becomes 1, and `partition_strategy`
for any variant but `row_partitioned` becomes `mod`; the duplicates this makes are dropped.
`[[exclude]]` patterns match the cells' effective values, wherever those were set.

Every error names the file and the key: `suites/x.toml: matrix.variant: unknown variant 'y'`.
"""

from __future__ import annotations

import itertools
import math
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError, UserError
from . import spec
from .cell import STRATEGIES, Cell, Distribution, Threads
from .spec import DataSpec, MeasureSpec, ModelSpec


def _positive_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _non_negative_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _choice(options):
    return lambda value: value in options


# axis -> (where it goes, check, what a valid value is)
AXES: dict[str, tuple[str, Callable[[Any], bool], str]] = {
    "batch_size": ("cell", _positive_int, "an integer >= 1"),
    "workers": ("cell", _positive_int, "an integer >= 1"),
    "variant": ("model", _choice(spec.VARIANTS), "a known variant (" + ", ".join(spec.VARIANTS) + ")"),
    "shards": ("model", _positive_int, "an integer >= 1"),
    "partition_strategy": ("model", _choice(spec.PARTITION_STRATEGIES), "mod or div"),
    "optimizer": ("model", _choice(spec.OPTIMIZERS), "a known optimizer (" + ", ".join(spec.OPTIMIZERS) + ")"),
    "device": ("model", _choice(spec.DEVICES), "cpu or gpu"),
    "learning_rate": ("model", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf,
                      "a finite number > 0"),
    "discretizer": ("model", lambda v: isinstance(v, bool), "true or false"),
    "normalization": ("model", lambda v: isinstance(v, bool), "true or false"),
    "out_dim": ("model", _positive_int, "an integer >= 1"),
    "intra_op_threads": ("threads", _non_negative_int, "an integer >= 0 (0 = default)"),
    "inter_op_threads": ("threads", _non_negative_int, "an integer >= 0 (0 = default)"),
    "omp_num_threads": ("threads", _positive_int, "an integer >= 1"),
    "mkl_num_threads": ("threads", _positive_int, "an integer >= 1"),
    "kmp_blocktime": ("threads", _non_negative_int, "an integer >= 0"),
    "onednn": ("threads", lambda v: isinstance(v, bool), "true or false"),
    "input": ("data", _choice(spec.INPUTS), "memory or pipeline"),
    "source": ("data", lambda v: isinstance(v, str) and bool(v), "a file path or glob"),
    "format": ("data", _choice(spec.DATA_FORMATS), "libsvm, criteo, tfrecord or blocks"),
    "text_parser": ("data", _choice(spec.TEXT_PARSERS), "op or tf.strings"),
    "strategy": ("distribution", _choice(STRATEGIES), "local or parameter_server"),
    "ps_tasks": ("distribution", _positive_int, "an integer >= 1"),
    "worker_tasks": ("distribution", _positive_int, "an integer >= 1"),
}
DEFAULT_BATCH_SIZE = 256  # the one axis with no home in a spec
SECTIONS = {"data": DataSpec, "model": ModelSpec, "measure": MeasureSpec, "distribution": Distribution}
TOP_KEYS = {"name", "description", "isolation", "data", "model", "measure", "distribution", "matrix", "exclude",
            "include"}
ISOLATIONS = ("cell", "env")


@dataclass
class Suite:
    name: str
    description: str
    source: str  # the file it came from, for messages
    text: str = ""  # the TOML itself, stored in results headers so --resume needs no file
    isolation: str = "cell"
    data: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    measure: dict[str, Any] = field(default_factory=dict)
    distribution: dict[str, Any] = field(default_factory=dict)
    matrix: dict[str, list] = field(default_factory=dict)
    exclude: list[dict[str, list]] = field(default_factory=list)
    include: list[dict[str, list]] = field(default_factory=list)

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: {message}")

    # -- expansion ---------------------------------------------------------------
    def cells(self) -> list[Cell]:
        """The matrix expanded, excludes applied, includes added, settings that do not
        apply to a variant collapsed, duplicates dropped."""
        combos = _product(self.matrix)
        for extra in self.include:
            combos += _product({**self.matrix, **extra})
        cells, seen = [], set()
        for combo in combos:
            cell = self._build(combo)
            if any(_matches(cell.axis_values(), ex) for ex in self.exclude):
                continue
            if cell.cell_id not in seen:
                seen.add(cell.cell_id)
                cells.append(cell)
        if not cells:
            raise self.error("matrix", "expands to no cells (everything excluded?)")
        return cells

    def _build(self, combo: dict[str, Any]) -> Cell:
        model_kw = {**self.model, **{k: v for k, v in combo.items() if AXES[k][0] == "model"}}
        variant = model_kw.get("variant", ModelSpec.variant)
        if variant not in spec.PARTITIONED_VARIANTS and ("shards" in combo or "variant" in combo):
            model_kw["shards"] = 1  # shards crossing a variant that has none
        if variant != "row_partitioned" and "partition_strategy" in model_kw:
            model_kw["partition_strategy"] = ModelSpec.partition_strategy
        thread_kw = {k: v for k, v in combo.items() if AXES[k][0] == "threads"}
        distribution_kw = {**self.distribution, **{k: v for k, v in combo.items() if AXES[k][0] == "distribution"}}
        if distribution_kw.get("strategy", Distribution.strategy) == "local":
            distribution_kw = {}  # ps_tasks / worker_tasks crossing a local cell: it has none
        try:
            cell = Cell(
                suite=self.name,
                batch_size=combo.get("batch_size", DEFAULT_BATCH_SIZE),
                workers=combo.get("workers", 1),
                model=spec.from_dict(ModelSpec, model_kw),
                data=spec.from_dict(DataSpec, {**self.data, **{k: v for k, v in combo.items() if AXES[k][0] == "data"}}),
                threads=Threads(**thread_kw),
                measure=spec.from_dict(MeasureSpec, self.measure),
                distribution=spec.from_dict(Distribution, distribution_kw),
            )
            cell.validate()
        except ConfigError as exc:
            raise self.error("matrix", f"cell {combo}: {exc}") from None
        return cell

    # -- overrides ---------------------------------------------------------------
    def override(self, assignment: str) -> None:
        """Apply `--set KEY=V1,V2`: an axis gets a list, a setting a single value. An axis
        that the suite set in `[model]` moves to the matrix, so it stays set in one place."""
        key, sep, raw = assignment.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--set {assignment}: expected KEY=VALUE[,VALUE...]")
        values = [_parse_scalar(v.strip()) for v in raw.split(",")]
        section_key = key.split(".", 1)
        axis = section_key[1] if len(section_key) == 2 and section_key[0] in SECTIONS else key
        if axis in AXES and (axis == key or AXES[axis][0] == section_key[0]):
            self._check_axis(f"--set {key}", axis, values)
            self.matrix[axis] = values
            if AXES[axis][0] in SECTIONS:
                getattr(self, AXES[axis][0]).pop(axis, None)
            return
        section, name = self._setting_of(key, assignment)
        self._check_setting(f"--set {key}", section, name, values[0] if len(values) == 1 else values)
        getattr(self, section)[name] = values[0] if len(values) == 1 else values

    def _setting_of(self, key: str, assignment: str) -> tuple[str, str]:
        if "." in key:
            section, name = key.split(".", 1)
            if section in SECTIONS and name in {f.name for f in fields(SECTIONS[section])}:
                return section, name
        else:
            owners = [s for s, cls in SECTIONS.items() if key in {f.name for f in fields(cls)}]
            if len(owners) == 1:
                return owners[0], key
            if len(owners) > 1:
                raise UserError(f"--set {key}: ambiguous; say {' or '.join(f'{o}.{key}' for o in owners)}")
        raise UserError(f"--set {key}: unknown axis or setting; axes: {', '.join(AXES)}")

    # -- validation --------------------------------------------------------------
    def _check_axis(self, where: str, axis: str, values: list) -> None:
        _, check, valid = AXES[axis]
        if not values:
            raise ConfigError(f"{where}: empty list")
        for value in values:
            if not check(value):
                raise ConfigError(f"{where}: {value!r} is not {valid}")

    def _check_setting(self, where: str, section: str, name: str, value: Any) -> None:
        try:
            built = spec.from_dict(SECTIONS[section], {**getattr(self, section), name: value})
            built.validate()
        except ConfigError as exc:
            raise ConfigError(f"{where}: {str(exc).split(': ', 1)[-1]}") from None

    def validate(self) -> None:
        if self.isolation not in ISOLATIONS:
            raise self.error("isolation", f"must be one of {', '.join(ISOLATIONS)}, got {self.isolation!r}")
        for section, cls in SECTIONS.items():
            settings = getattr(self, section)
            if not isinstance(settings, dict):
                raise self.error(section, "must be a table")
            try:
                spec.from_dict(cls, settings).validate()
            except ConfigError as exc:
                raise self.error(f"{section}.{str(exc).split(':', 1)[0]}", str(exc).split(": ", 1)[-1]) from None
        if not self.matrix:
            raise self.error("matrix", "missing or empty: a suite needs at least one axis")
        for axis, values in self.matrix.items():
            if axis not in AXES:
                raise self.error(f"matrix.{axis}", f"unknown axis; known: {', '.join(AXES)}")
            self._check_axis(f"{self.source}: matrix.{axis}", axis, values)
            home = AXES[axis][0]
            if home in SECTIONS and axis in getattr(self, home):
                raise self.error(f"{home}.{axis}", f"also set as matrix.{axis}; set it in one place")
        for kind in ("exclude", "include"):
            for i, entry in enumerate(getattr(self, kind)):
                for axis, values in entry.items():
                    if axis not in AXES:
                        raise self.error(f"{kind}[{i}].{axis}", f"unknown axis; known: {', '.join(AXES)}")
                    self._check_axis(f"{self.source}: {kind}[{i}].{axis}", axis, values)


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, list) else [value]


def _product(axes: dict[str, list]) -> list[dict[str, Any]]:
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*(axes[n] for n in names))]


def _matches(combo: dict[str, Any], pattern: dict[str, list]) -> bool:
    return all(combo.get(axis) in values for axis, values in pattern.items())


def _parse_scalar(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("none", "null"):
        return None  # unsets a setting that accepts none (seconds_per_window, learning_rate)
    if lowered in ("true", "on", "yes"):
        return True
    if lowered in ("false", "off", "no"):
        return False
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# -- loading -----------------------------------------------------------------------
def shipped_suites() -> dict[str, Any]:
    """Suite name -> resource for every TOML shipped inside the package.

    Installed, they are the package `sparsebench.suites`; run from a source checkout
    (PYTHONPATH pointing at it), they are the top-level `suites/` folder beside the package.
    """
    try:
        folder = resources.files("sparsebench.suites")
    except ModuleNotFoundError:
        folder = Path(__file__).resolve().parent.parent.parent / "suites"
    if not folder.is_dir():  # a package copied without its suites: no shipped suite, paths still load
        return {}
    return {entry.name[:-5]: entry for entry in folder.iterdir() if entry.name.endswith(".toml")}


def load_suite(name_or_path: str) -> Suite:
    """A shipped suite by name, or any TOML file by path."""
    shipped = shipped_suites()
    path = Path(name_or_path)
    if name_or_path in shipped:
        resource = shipped[name_or_path]
        text, source, default_name = resource.read_text(), f"suites/{name_or_path}.toml", name_or_path
    elif path.suffix == ".toml" or path.exists():
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise UserError(f"{path}: no such suite file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: cannot read suite file: {exc}") from None
        source, default_name = str(path), path.stem
    else:
        raise UserError(f"unknown suite {name_or_path!r}; shipped suites: {', '.join(sorted(shipped))} (or give a .toml path)")
    return parse_suite(text, source, default_name)


def parse_suite(text: str, source: str, default_name: str) -> Suite:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise ConfigError(f"{source}: {unknown[0]}: unknown key; known: {', '.join(sorted(TOP_KEYS))}")
    matrix = raw.get("matrix", {})
    if not isinstance(matrix, dict):
        raise ConfigError(f"{source}: matrix: must be a table of axis = [values]")
    for kind in ("exclude", "include"):
        entries = raw.get(kind, [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ConfigError(f"{source}: {kind}: must be an array of tables ([[{kind}]])")
    suite = Suite(
        name=str(raw.get("name", default_name)),
        description=str(raw.get("description", "")),
        source=source,
        text=text,
        isolation=raw.get("isolation", "cell"),
        data=raw.get("data", {}),
        model=raw.get("model", {}),
        measure=raw.get("measure", {}),
        distribution=raw.get("distribution", {}),
        matrix={axis: _as_list(values) for axis, values in matrix.items()},
        exclude=[{a: _as_list(v) for a, v in e.items()} for e in raw.get("exclude", [])],
        include=[{a: _as_list(v) for a, v in e.items()} for e in raw.get("include", [])],
    )
    suite.validate()
    return suite

