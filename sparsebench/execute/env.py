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

from ..modules import module_command
from ..lifetime import die_with_parent
from ..machine import cpu_count, cpu_info, gpu_info, memory_info
from .orchestrator import inherited_variables


def probe_tensorflow(timeout_s: float = 120.0, python: str = sys.executable) -> dict[str, Any]:
    """`tensorflow_info()` from a fresh worker process (the caller stays TF-free)."""
    try:
        done = subprocess.run(
            module_command(python, "sparsebench.train.worker", "--probe"),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
            preexec_fn=die_with_parent,  # a kill -9 of the parent must not leave the probe running
        )
    except subprocess.TimeoutExpired:
        return {"error": f"TensorFlow probe timed out after {timeout_s:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"TensorFlow probe failed: {last}"}
    return json.loads(lines[-1])


def fingerprint(python: str = sys.executable, tensorflow: dict[str, Any] | None = None) -> dict[str, Any]:
    """The machine, and TensorFlow as `python` (this interpreter by default) sees it:
    `tensorflow`, TensorFlow's facts where a process that imported it already said them
    (the op build does), else a probe."""
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
    result["worker_variables"], result["ignored_variables"] = inherited_variables()
    result["tensorflow"] = tensorflow if tensorflow is not None else probe_tensorflow(python=python)
    return result
