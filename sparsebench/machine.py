"""Facts about the machine that need no TensorFlow: CPU, cores, memory and NVIDIA GPUs.

Both sides use them: the parent stores them in every run's environment fingerprint (and
compares fingerprints before `compare` and `--resume`), and the worker reports the cores it
may use beside the thread counts in effect.
"""

from __future__ import annotations

import os
import platform
from typing import Any

_CPU_FLAGS_OF_INTEREST = ("avx", "avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "fma", "sse4_2")


def cpu_info() -> dict[str, Any]:
    try:
        import cpuinfo

        info = cpuinfo.get_cpu_info()
    except Exception as exc:  # noqa: BLE001 - the fingerprint must not fail a run
        return {"model": platform.processor() or "unknown", "error": str(exc)}
    flags = info.get("flags", [])
    return {
        "model": info.get("brand_raw") or "unknown",
        "arch": info.get("arch_string_raw"),
        "hz_advertised": info.get("hz_advertised_friendly"),
        "flags": sorted(flags),
        "key_flags": [f for f in _CPU_FLAGS_OF_INTEREST if f in flags],
    }


def memory_info() -> dict[str, Any]:
    import psutil

    return {"total_gb": round(psutil.virtual_memory().total / 2**30, 2)}


def gpu_info() -> list[dict[str, Any]]:
    """GPUs as NVML sees them (empty where there is no driver)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no NVIDIA driver: no GPU
        return []
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            gpus.append(
                {
                    "index": i,
                    "name": name.decode() if isinstance(name, bytes) else name,
                    "driver": driver.decode() if isinstance(driver, bytes) else driver,
                    "memory_total_mb": round(pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2**20),
                }
            )
        return gpus
    finally:
        pynvml.nvmlShutdown()


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def field_at(env: Any, *keys: str) -> Any:
    """env[k1][k2]..., or None where a level is missing or not an object (a damaged file's
    fingerprint must not crash a comparison)."""
    for key in keys:
        if not isinstance(env, dict):
            return None
        env = env.get(key)
    return env


def _gpu_names(env: Any) -> str:
    gpus = field_at(env, "gpus")
    if not isinstance(gpus, list):
        return "none" if gpus is None else f"unreadable ({gpus!r})"
    return ", ".join(str(field_at(g, "name") or "?") for g in gpus) or "none"


# What makes two fingerprints measure different machines: (name, how to read it).
FINGERPRINT_KEYS = (
    ("CPU model", lambda env: field_at(env, "cpu", "model")),
    ("cores available", lambda env: field_at(env, "cores_available")),
    ("TensorFlow version", lambda env: field_at(env, "tensorflow", "version")),
    ("TF oneDNN build", lambda env: field_at(env, "tensorflow", "onednn_built")),
    ("GPUs", _gpu_names),
    ("TF/XLA variables passed to workers", lambda env: field_at(env, "worker_variables")),
)


def environment_differences(base: dict[str, Any], cur: dict[str, Any]) -> list[str]:
    """One line per fingerprint fact that differs between two runs' environments."""
    out = []
    for name, get in FINGERPRINT_KEYS:
        a, b = get(base), get(cur)
        if a != b:
            out.append(f"{name} differs: baseline {a!r}, current {b!r}")
    return out


# What two sides of an A/B run may differ in beyond their code, each a fact that changes what
# a worker does: (name, how to read it from a results header).
SIDE_KEYS = (
    ("Python", lambda h: field_at(h, "environment", "python")),
    ("TensorFlow version", lambda h: field_at(h, "environment", "tensorflow", "version")),
    ("TensorFlow build", lambda h: field_at(h, "environment", "tensorflow", "build")),
    ("TF oneDNN build", lambda h: field_at(h, "environment", "tensorflow", "onednn_built")),
    ("worker variables", lambda h: field_at(h, "environment", "worker_variables")),
    ("fused op build flags", lambda h: field_at(h, "run", "custom_op", "flags")),
    ("fused op target", lambda h: field_at(h, "run", "custom_op", "target")),
    ("fused op compiler", lambda h: field_at(h, "run", "custom_op", "compiler")),
)


def _differing(a: Any, b: Any) -> str:
    """'A x, B y', or for two mappings only the keys whose values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        return "; ".join(f"{k}: A {a.get(k, '(unset)')!r}, B {b.get(k, '(unset)')!r}" for k in keys)
    return f"A {a!r}, B {b!r}"


def side_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """One line per fact that differs between two sides' results headers (`ab`): the
    interpreter, TensorFlow's version and build, the variables every worker gets, the
    fused op's build. Each side's header is written by its own code, so a side that changed
    what reaches its workers shows here."""
    return [f"{name}: {_differing(get(a), get(b))}" for name, get in SIDE_KEYS if get(a) != get(b)]
