"""Accelerator utilisation: NVML's GPU utilisation where a GPU serves the model.

On CPU (or without a driver) there is nothing to read and load reports use
the engine's busy fraction instead; the report says which it is.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class NvmlUtilization:
    """Reads one GPU's utilisation through NVML (the ``nvidia-ml-py`` package)."""

    def __init__(self, index: int) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)

    def read(self) -> float:
        return self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu / 100.0


def nvml_for(device: str) -> NvmlUtilization | None:
    """An NVML reader for a ``cuda[:N]`` device, or None (CPU, no driver, no package)."""
    if not device.startswith("cuda"):
        return None
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    try:
        return NvmlUtilization(index)
    except Exception as exc:  # noqa: BLE001 - no NVML: fall back to the engine's busy fraction
        log.warning("NVML unavailable for %s (%s); reporting the engine's busy fraction", device, exc)
        return None
