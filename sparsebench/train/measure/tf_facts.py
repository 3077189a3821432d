"""What TensorFlow is in this worker process and how it is configured.

Read inside the worker, after TensorFlow was imported with the cell's environment: the
version and build (oneDNN, CUDA), the GPUs it sees, and the thread pools in effect.
`sparsebench env` gets the same facts through `python -m sparsebench.train.worker --probe`.
"""

from __future__ import annotations

import os
from typing import Any

from ...machine import cpu_count


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


def threads_in_effect() -> dict[str, Any]:
    """What TensorFlow and the environment report now; 0 means TF picks (all cores)."""
    import tensorflow as tf

    intra = tf.config.threading.get_intra_op_parallelism_threads()
    inter = tf.config.threading.get_inter_op_parallelism_threads()
    return {
        "intra_op_threads": intra,
        "inter_op_threads": inter,
        "intra_op_threads_resolved": intra or cpu_count(),
        "inter_op_threads_resolved": inter or cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "mkl_num_threads": os.environ.get("MKL_NUM_THREADS"),
        "kmp_blocktime": os.environ.get("KMP_BLOCKTIME"),
        "tf_enable_onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
        "cpu_count": cpu_count(),
        "os_threads": os_threads(),
    }


def os_threads() -> dict[str, int] | None:
    """This process's threads by name, as the kernel sees them (Linux): an observation
    independent of what TensorFlow was told. TensorFlow names its inter-op pool's threads
    `tf_Compute`; the intra-op pool's threads carry the process's name."""
    names: dict[str, int] = {}
    try:
        for task in os.scandir("/proc/self/task"):
            with open(os.path.join(task.path, "comm")) as fh:
                name = fh.read().strip()
            names[name] = names.get(name, 0) + 1
    except OSError:
        return None
    return {"total": sum(names.values()), **dict(sorted(names.items()))}
