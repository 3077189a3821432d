"""Building and loading the fused custom op: `fused_layer.cc` -> a cached shared library.

The library is compiled by the system C++ compiler (`CXX`, default `c++`) against the
installed TensorFlow, with TensorFlow's own flags (`tf.sysconfig.get_compile_flags()` /
`get_link_flags()`), once per (source, TensorFlow version, compiler, flags, CPU): that
tuple's hash names the library in a per-user cache (`SPARSEBENCH_OPS_CACHE`, else
`$XDG_CACHE_HOME/sparsebench/ops`, else `~/.cache/sparsebench/ops`). Several workers may
start at once: a file lock lets one compile while the others wait, and the library is
written under a temporary name and renamed, so a half-written file is never loaded.
A failed compile is one line plus the path of the full compiler log.

`python -m sparsebench.train.custom_ops build|status [--json]` runs this in a process of
its own, so the parent (which never imports TensorFlow) can build before any cell is
timed: compile time is never inside a cell's timing or its timeout.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shlex
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ...errors import CellSkipped
from ...lifetime import die_with_parent

SOURCE = Path(__file__).with_name("fused_layer.cc")
LIBRARY_NAME = "sparsebench_fused_layer"
# -march=native: the CPU is in the key. SPARSEBENCH_OPS_MARCH overrides it: `ab --count`
# builds for x86-64-v3 (AVX2), because valgrind cannot execute AVX-512 (SIGILL).
MARCH_VARIABLE = "SPARSEBENCH_OPS_MARCH"
OPTIMIZATION = ["-O3", "-march=native", "-fno-math-errno"]
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


def _tensorflow_flags() -> tuple[str, list[str], list[str]]:
    import tensorflow as tf

    compile_flags, link_flags = tf.sysconfig.get_compile_flags(), tf.sysconfig.get_link_flags()
    include = next((f[2:] for f in compile_flags if f.startswith("-I")), None)
    if include is None or not (Path(include) / "tensorflow" / "core" / "framework" / "op_kernel.h").exists():
        raise CustomOpUnavailable("this TensorFlow installation ships no C++ headers (tensorflow/core/framework/"
                                  "op_kernel.h is missing), so custom ops cannot be compiled against it")
    return tf.__version__, compile_flags, link_flags


# -march=native on a CPU with AVX512-FP16 (Sapphire Rapids and later) makes GCC 12 compile
# Eigen's FP16 packet math, which it cannot (errors in PacketMathFP16.h): the op uses no
# half-precision arithmetic, so FP16 is switched off where the compiler knows the flag.
NO_FP16 = "-mno-avx512fp16"


def _optimization(cxx: str) -> list[str]:
    """OPTIMIZATION (with the target of SPARSEBENCH_OPS_MARCH, where set) plus the flags
    this compiler needs on this CPU."""
    march = os.environ.get(MARCH_VARIABLE)
    if march:
        return [f"-march={march}" if flag == "-march=native" else flag for flag in OPTIMIZATION]
    try:
        probe = subprocess.run([cxx, NO_FP16, "-x", "c++", "-E", "-o", os.devnull, os.devnull],
                               capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return list(OPTIMIZATION)
    return [*OPTIMIZATION, NO_FP16] if probe.returncode == 0 else list(OPTIMIZATION)


def _command(cxx: str, output: Path, compile_flags: list[str], link_flags: list[str],
             optimization: list[str]) -> list[str]:
    return [cxx, "-std=c++17", "-shared", "-fPIC", *optimization, str(SOURCE), "-o", str(output),
            *compile_flags, *link_flags]


def plan() -> tuple[Path, list[str], str, str]:
    """(library path, compile command, cache key, compiler) for this machine."""
    cxx = compiler()
    identity = _compiler_identity(cxx)
    version, compile_flags, link_flags = _tensorflow_flags()
    optimization = _optimization(cxx)
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), version.encode(), identity.encode(),
                 " ".join(optimization + compile_flags + link_flags).encode(), _cpu_flags().encode()):
        digest.update(part)
        digest.update(b"\0")
    key = digest.hexdigest()[:16]
    library = cache_dir() / f"{LIBRARY_NAME}-tf{version}-{key}.so"
    return library, _command(cxx, library, compile_flags, link_flags, optimization), key, cxx


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


def build(compile_if_missing: bool = True) -> BuildInfo:
    """The library for this machine, compiled if the cache does not hold it yet."""
    try:
        library, command, key, cxx = plan()
    except CustomOpUnavailable as exc:
        return BuildInfo(False, reason=exc.why)
    if library.exists() and damage(library) is None:
        return BuildInfo(True, library=str(library), cached=True, key=key, compiler=cxx)
    if not compile_if_missing:
        why = (f"the cached library is damaged ({damage(library)}); `sparsebench ops build` rebuilds it"
               if library.exists() else f"not built yet ({library} is missing)")
        return BuildInfo(False, library=str(library), reason=why, key=key, compiler=cxx)
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
        if library.exists() and damaged is None:
            return BuildInfo(True, library=str(library), cached=True, key=key, compiler=cxx)
        partial = folder / f".{library.name}.{os.getpid()}.tmp"
        log = folder / f"{library.stem}.log"
        command[command.index(str(library))] = str(partial)
        started = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S,
                                  preexec_fn=die_with_parent)
        except subprocess.TimeoutExpired:
            return BuildInfo(False, reason=f"compiling the custom op took over {COMPILE_TIMEOUT_S} s", key=key,
                             compiler=cxx)
        except OSError as exc:
            return BuildInfo(False, reason=f"cannot run {cxx!r}: {exc.strerror}", key=key, compiler=cxx)
        seconds = time.perf_counter() - started
        log.write_text(f"$ {shlex.join(command)}\n\n{done.stdout}{done.stderr}")
        if done.returncode != 0 or not partial.exists():
            partial.unlink(missing_ok=True)
            first = next((line for line in done.stderr.splitlines() if "error" in line), "no error message")
            return BuildInfo(False, reason=f"compiling the custom op failed: {first.strip()[:200]}", log=str(log),
                             key=key, compiler=cxx)
        checksum = _checksum_file(library)
        partial_checksum = folder / f".{checksum.name}.{os.getpid()}.tmp"
        partial_checksum.write_text(_digest(partial) + "\n")
        os.replace(partial_checksum, checksum)  # the checksum first: a library is never without one
        os.replace(partial, library)
        return BuildInfo(True, library=str(library), log=str(log), compile_seconds=seconds, key=key, compiler=cxx,
                         replaced=damaged)


_loaded = None


def load():
    """The loaded op library (building it first if needed); CustomOpUnavailable otherwise."""
    global _loaded
    if _loaded is None:
        import tensorflow as tf

        info = build()
        if not info.ok:
            raise CustomOpUnavailable(info.reason + (f" (compiler log: {info.log})" if info.log else ""))
        try:
            _loaded = tf.load_op_library(info.library)
        except (tf.errors.NotFoundError, OSError) as exc:
            raise CustomOpUnavailable(f"cannot load {info.library}: {str(exc).splitlines()[0][:200]}") from None
    return _loaded


def as_dict(info: BuildInfo) -> dict:
    return asdict(info)
