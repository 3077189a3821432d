"""Building and loading the custom ops: `fused_layer.cc` and `parse_text.cc` -> a cached shared library.

The library is compiled by the system C++ compiler (`CXX`, default `c++`) against the
installed TensorFlow, with TensorFlow's own flags (`tf.sysconfig.get_compile_flags()` /
`get_link_flags()`), once per (source, TensorFlow version and build, compiler, flags,
CPU): that tuple's hash names the library in a per-user cache (`SPARSEBENCH_OPS_CACHE`,
else `$XDG_CACHE_HOME/sparsebench/ops`, else `~/.cache/sparsebench/ops`). Several workers
may start at once: a file lock lets one compile while the others wait, and the library is
written under a temporary name and renamed, so a half-written file is never loaded.
A failed compile is one line plus the path of the full compiler log.

Loading needs no compiler: a manifest beside the library, named by what is known without
asking the compiler (source, TensorFlow build, target, CPU), says which library serves
this machine, so a worker loads it without running the compiler to plan a build, and a
machine with no compiler loads a library built before. (A changed compiler therefore does
not rebuild by itself: `sparsebench ops build --force` does.)

Targets (`SPARSEBENCH_OPS_TARGET`): `native` (default, `-march=native`) or `portable`
(`-mavx2 -mfma`: any x86-64 CPU of the last decade, for a library built once and copied).
`SPARSEBENCH_OPS_MARCH` names an exact `-march` instead (`ab --count` builds for
x86-64-v3: valgrind cannot execute AVX-512). The flags used travel with every record.

`python -m sparsebench.train.custom_ops build|status [--json]` runs this in a process of
its own, so the parent (which never imports TensorFlow) can build before any cell is
timed: compile time is never inside a cell's timing or its timeout.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ...errors import CellSkipped
from ...lifetime import die_with_parent

SOURCES = (Path(__file__).with_name("fused_layer.cc"), Path(__file__).with_name("parse_text.cc"))
LIBRARY_NAME = "sparsebench_fused_layer"
# -march=native: the CPU is in the key. SPARSEBENCH_OPS_MARCH overrides it: `ab --count`
# builds for x86-64-v3 (AVX2), because valgrind cannot execute AVX-512 (SIGILL).
MARCH_VARIABLE = "SPARSEBENCH_OPS_MARCH"
TARGET_VARIABLE = "SPARSEBENCH_OPS_TARGET"
TARGETS = {"native": ["-march=native"], "portable": ["-mavx2", "-mfma"]}
# -DNDEBUG: TensorFlow's DCHECKs and the op's own asserts are off, as in TensorFlow's wheel.
OPTIMIZATION = ["-O3", "-march=native", "-fno-math-errno", "-DNDEBUG"]
COMPILE_TIMEOUT_S = 600


class CustomOpUnavailable(CellSkipped):
    """The op cannot be built or loaded here: its cells are `skipped: custom op unavailable: ...`."""

    def __init__(self, why: str):
        super().__init__(f"custom op unavailable: {why}")
        self.why = why


@dataclass
class BuildInfo:
    ok: bool
    library: str | None = None
    reason: str | None = None
    log: str | None = None
    cached: bool = False
    compile_seconds: float | None = None
    key: str | None = None
    compiler: str | None = None
    replaced: str | None = None  # why a cached library at this path was rebuilt (damaged)
    flags: list[str] | None = None  # the optimization flags it was compiled with
    target: str | None = None  # native, portable or the -march of SPARSEBENCH_OPS_MARCH


def cache_dir() -> Path:
    if os.environ.get("SPARSEBENCH_OPS_CACHE"):
        return Path(os.environ["SPARSEBENCH_OPS_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "sparsebench" / "ops"


def compiler() -> str:
    return os.environ.get("CXX") or "c++"


def _compiler_identity(cxx: str) -> str:
    path = shutil.which(cxx)
    if path is None:
        raise CustomOpUnavailable(f"C++ compiler {cxx!r} not found (install g++, or set CXX to a C++ compiler)")
    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise CustomOpUnavailable(f"C++ compiler {cxx!r} does not run: {exc}") from None
    return f"{path}\n{done.stdout}"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform

    return platform.processor()


def _tensorflow_identity() -> str:
    """TensorFlow's version and build (its git describe): two builds of one version need
    two libraries."""
    import tensorflow as tf

    return f"{tf.__version__} {tf.version.GIT_VERSION}"


def _tensorflow_flags() -> tuple[str, list[str], list[str]]:
    import tensorflow as tf

    compile_flags, link_flags = tf.sysconfig.get_compile_flags(), tf.sysconfig.get_link_flags()
    include = next((f[2:] for f in compile_flags if f.startswith("-I")), None)
    if include is None or not (Path(include) / "tensorflow" / "core" / "framework" / "op_kernel.h").exists():
        raise CustomOpUnavailable("this TensorFlow installation ships no C++ headers (tensorflow/core/framework/"
                                  "op_kernel.h is missing), so custom ops cannot be compiled against it")
    return tf.__version__, compile_flags, link_flags


def target() -> str:
    """The build target: SPARSEBENCH_OPS_MARCH's -march where set, else SPARSEBENCH_OPS_TARGET
    (native or portable)."""
    march = os.environ.get(MARCH_VARIABLE)
    if march:
        return march
    name = os.environ.get(TARGET_VARIABLE) or "native"
    if name not in TARGETS:
        raise CustomOpUnavailable(f"{TARGET_VARIABLE}={name!r}: not a build target (known: {', '.join(TARGETS)})")
    return name


# -march=native on a CPU with AVX512-FP16 (Sapphire Rapids and later) makes GCC 12 compile
# Eigen's FP16 packet math, which it cannot (errors in PacketMathFP16.h): the op uses no
# half-precision arithmetic, so FP16 is switched off where the compiler knows the flag.
NO_FP16 = "-mno-avx512fp16"


def _optimization(cxx: str) -> list[str]:
    """OPTIMIZATION with the target's architecture flags, plus the flags this compiler
    needs on this CPU."""
    name = target()
    arch = TARGETS.get(name, [f"-march={name}"])
    flags = [part for flag in OPTIMIZATION for part in (arch if flag == "-march=native" else [flag])]
    if name != "native":
        return flags
    try:
        probe = subprocess.run([cxx, NO_FP16, "-x", "c++", "-E", "-o", os.devnull, os.devnull],
                               capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return flags
    return [*flags, NO_FP16] if probe.returncode == 0 else flags


def _command(cxx: str, output: Path, compile_flags: list[str], link_flags: list[str],
             optimization: list[str]) -> list[str]:
    return [cxx, "-std=c++17", "-shared", "-fPIC", *optimization, *map(str, SOURCES), "-o", str(output),
            *compile_flags, *link_flags]


def _source_bytes() -> bytes:
    return b"\0".join(source.read_bytes() for source in SOURCES)


def _hash(*parts: str | bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


@dataclass
class Plan:
    """How this machine's library is built: its path, the compile command and the cache key."""

    library: Path
    command: list[str]
    key: str
    compiler: str
    flags: list[str]
    target: str


def plan() -> Plan:
    """The build of this machine's library (runs the compiler to identify it)."""
    cxx = compiler()
    identity = _compiler_identity(cxx)
    version, compile_flags, link_flags = _tensorflow_flags()
    optimization = _optimization(cxx)
    key = _hash(_source_bytes(), _tensorflow_identity(), identity, " ".join(optimization + compile_flags + link_flags),
                _cpu_flags())
    library = cache_dir() / f"{LIBRARY_NAME}-tf{version}-{key}.so"
    return Plan(library, _command(cxx, library, compile_flags, link_flags, optimization), key, cxx, optimization,
                target())


def manifest_path() -> Path:
    """Where the manifest of this machine's library lies, named by what is known without a
    compiler: the source, TensorFlow's build, the target and the CPU."""
    return cache_dir() / f"{LIBRARY_NAME}-{_hash(_source_bytes(), _tensorflow_identity(), target(), _cpu_flags())}.json"


def _from_manifest() -> BuildInfo | None:
    """The cached library the manifest names, if it is there and intact (no compiler run)."""
    try:
        manifest = json.loads(manifest_path().read_text())
        library = Path(manifest["library"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not library.exists() or damage(library) is not None:
        return None
    return BuildInfo(True, library=str(library), cached=True, key=manifest.get("key"),
                     compiler=manifest.get("compiler"), flags=manifest.get("flags"), target=manifest.get("target"))


def _write_manifest(info: BuildInfo) -> None:
    path = manifest_path()
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        partial.write_text(json.dumps({"library": info.library, "key": info.key, "compiler": info.compiler,
                                       "flags": info.flags, "target": info.target}))
        os.replace(partial, path)
    except OSError:
        partial.unlink(missing_ok=True)  # without a manifest the next load plans with the compiler


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _checksum_file(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def damage(library: Path) -> str | None:
    """Why the cached `library` is not the one this builder wrote (None: it is). Its
    SHA-256 is written beside it when it is built, so a truncated or foreign file at the
    library's path is rebuilt, never loaded."""
    try:
        expected = _checksum_file(library).read_text().strip()
    except OSError:
        return f"{library.name} has no checksum beside it (not written by this builder)"
    try:
        actual = _digest(library)
    except OSError as exc:
        return f"{library.name} cannot be read: {exc.strerror}"
    return None if actual == expected else f"{library.name} does not match its checksum"


def status() -> BuildInfo:
    """Whether the library for this machine is built, without building it."""
    return build(compile_if_missing=False)


def build(compile_if_missing: bool = True, force: bool = False) -> BuildInfo:
    """The library for this machine: the one the manifest names (no compiler needed), else
    compiled if the cache does not hold it yet. `force`: compile again whatever is cached."""
    try:
        cached = None if force else _from_manifest()
        if cached is not None:
            return cached
        built = _build(compile_if_missing, force)
    except CustomOpUnavailable as exc:
        return BuildInfo(False, reason=exc.why)
    if built.ok:
        _write_manifest(built)
    return built


def _build(compile_if_missing: bool, force: bool) -> BuildInfo:
    planned = plan()
    library, command, key, cxx = planned.library, planned.command, planned.key, planned.compiler
    described = {"key": key, "compiler": cxx, "flags": planned.flags, "target": planned.target}
    if library.exists() and damage(library) is None and not force:
        return BuildInfo(True, library=str(library), cached=True, **described)
    if not compile_if_missing:
        why = (f"the cached library is damaged ({damage(library)}); `sparsebench ops build` rebuilds it"
               if library.exists() else f"not built yet ({library} is missing)")
        return BuildInfo(False, library=str(library), reason=why, **described)
    folder = library.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / f"{library.stem}.lock", "w")
    except OSError as exc:
        return BuildInfo(False, reason=f"{folder}: cannot write the op cache: {exc.strerror} "
                                       f"(set SPARSEBENCH_OPS_CACHE to a writable folder)")
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be compiling the same library
        damaged = damage(library) if library.exists() else None
        if library.exists() and damaged is None and not force:
            return BuildInfo(True, library=str(library), cached=True, **described)
        partial = folder / f".{library.name}.{os.getpid()}.tmp"
        log = folder / f"{library.stem}.log"
        command[command.index(str(library))] = str(partial)
        started = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S,
                                  preexec_fn=die_with_parent)
        except subprocess.TimeoutExpired:
            return BuildInfo(False, reason=f"compiling the custom op took over {COMPILE_TIMEOUT_S} s", **described)
        except OSError as exc:
            return BuildInfo(False, reason=f"cannot run {cxx!r}: {exc.strerror}", **described)
        seconds = time.perf_counter() - started
        log.write_text(f"$ {shlex.join(command)}\n\n{done.stdout}{done.stderr}")
        if done.returncode != 0 or not partial.exists():
            partial.unlink(missing_ok=True)
            first = next((line for line in done.stderr.splitlines() if "error" in line), "no error message")
            return BuildInfo(False, reason=f"compiling the custom op failed: {first.strip()[:200]}", log=str(log),
                             **described)
        checksum = _checksum_file(library)
        partial_checksum = folder / f".{checksum.name}.{os.getpid()}.tmp"
        partial_checksum.write_text(_digest(partial) + "\n")
        os.replace(partial_checksum, checksum)  # the checksum first: a library is never without one
        os.replace(partial, library)
        return BuildInfo(True, library=str(library), log=str(log), compile_seconds=seconds, replaced=damaged,
                         **described)


_loaded = None
_loaded_info: BuildInfo | None = None


def load(compile_if_missing: bool = True):
    """The loaded op library (building it first if needed and allowed); CustomOpUnavailable
    otherwise."""
    global _loaded, _loaded_info
    if _loaded is None:
        import tensorflow as tf

        info = build(compile_if_missing=compile_if_missing)
        if not info.ok:
            raise CustomOpUnavailable(info.reason + (f" (compiler log: {info.log})" if info.log else ""))
        try:
            _loaded = tf.load_op_library(info.library)
        except (tf.errors.NotFoundError, OSError) as exc:
            raise CustomOpUnavailable(f"cannot load {info.library}: {str(exc).splitlines()[0][:200]}") from None
        _loaded_info = info
    return _loaded


def loaded_library() -> str | None:
    """The path of the library this process loaded (None if none): what a local cluster's
    tasks load too."""
    return None if _loaded_info is None else _loaded_info.library


def loaded_build() -> dict | None:
    """How the loaded library was built (target and flags), for the record; None if none is loaded."""
    if _loaded_info is None:
        return None
    return {"target": _loaded_info.target, "flags": _loaded_info.flags, "key": _loaded_info.key}


def as_dict(info: BuildInfo) -> dict:
    return asdict(info)
