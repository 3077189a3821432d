"""Samples GPU utilization and memory through NVML while a GPU cell is timed.

TensorFlow's own memory stats miss other processes and say nothing of utilization;
NVML answers both. Sampling runs in a thread at a fixed interval; on a machine without
an NVIDIA driver the sampler reports that it is unavailable and never fails the cell.
"""

from __future__ import annotations

import threading
from typing import Any


class GpuSampler:
    def __init__(self, index: int = 0, interval_s: float = 0.1):
        self.index = index
        self.interval_s = interval_s
        self.utilization: list[float] = []
        self.memory_used_mb: list[float] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = None

    def __enter__(self) -> "GpuSampler":
        self.start()
        return self

    def start(self) -> None:
        """Begin sampling (the worker calls it when the timed windows start, after warm-up)."""
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
        except Exception as exc:  # noqa: BLE001 - no driver, no GPU: nothing to sample
            self.error = f"NVML unavailable: {exc}"
            return
        self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        nvml = self._nvml
        while not self._stop.is_set():
            try:
                self.utilization.append(float(nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu))
                self.memory_used_mb.append(nvml.nvmlDeviceGetMemoryInfo(self._handle).used / 2**20)
            except Exception as exc:  # noqa: BLE001
                self.error = str(exc)
                return
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass

    def summary(self) -> dict[str, Any]:
        if not self.utilization:
            return {"gpu_util_pct": None, "gpu_mem_used_mb": None, "gpu_samples": 0, "gpu_error": self.error}
        return {
            "gpu_util_pct": sum(self.utilization) / len(self.utilization),
            "gpu_mem_used_mb": max(self.memory_used_mb),
            "gpu_samples": len(self.utilization),
            "gpu_error": self.error,
        }
