"""The environment fingerprint stored with every run and printed by `sparsebench env`.

A throughput figure means little without the machine behind it: compare warns when two
runs' fingerprints differ. The CLI never imports TensorFlow, so TensorFlow's own facts
(version, oneDNN/CUDA build info, visible GPUs) are read by a short-lived worker process
(`python -m sparsebench.train.worker --probe`) and merged in.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
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


def tensorflow_info() -> dict[str, Any]:
    """TensorFlow's facts; imports TensorFlow, so only workers call it."""
    import tensorflow as tf

    build = {k: (v if isinstance(v, (str, int, float, bool)) else str(v)) for k, v in tf.sysconfig.get_build_info().items()}
    try:
        from tensorflow.python.util import _pywrap_util_port

        onednn_built = bool(_pywrap_util_port.IsMklEnabled())
    except Exception:  # noqa: BLE001 - private API moved
        onednn_built = None
    return {
        "version": tf.__version__,
        "build": build,
        "onednn_built": onednn_built,
        "onednn_env": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
        "gpus_visible": [d.name for d in tf.config.list_physical_devices("GPU")],
    }


def probe_tensorflow(timeout_s: float = 120.0) -> dict[str, Any]:
    """`tensorflow_info()` from a fresh worker process (the caller stays TF-free)."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "sparsebench.train.worker", "--probe"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
        )
    except subprocess.TimeoutExpired:
        return {"error": f"TensorFlow probe timed out after {timeout_s:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"TensorFlow probe failed: {last}"}
    return json.loads(lines[-1])


def fingerprint(with_tensorflow: bool = True) -> dict[str, Any]:
    import psutil

    result = {
        "hostname": platform.node(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_info(),
        "cores_logical": psutil.cpu_count(logical=True),
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_available": cpu_count(),
        "memory": memory_info(),
        "gpus": gpu_info(),
    }
    if with_tensorflow:
        result["tensorflow"] = probe_tensorflow()
    return result
