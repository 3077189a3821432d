"""Which TensorFlow device a cell runs on, and a typed error when it is not there.

A cell asks for `cpu` or `gpu`; asking for a GPU on a machine where TensorFlow sees none
raises `NoGPUError`, which the runner records as `skipped: no GPU` instead of a failure.
"""

from __future__ import annotations

from ...errors import ConfigError, NoGPUError


def resolve_device(device: str) -> str:
    """`cpu` -> `/CPU:0`, `gpu` -> `/GPU:0` (or NoGPUError)."""
    import tensorflow as tf

    if device == "cpu":
        return "/CPU:0"
    if device == "gpu":
        if not tf.config.list_physical_devices("GPU"):
            raise NoGPUError()
        return "/GPU:0"
    raise ConfigError(f"device: must be 'cpu' or 'gpu', got {device!r}")
