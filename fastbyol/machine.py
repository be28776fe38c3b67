"""What a measured figure depends on: the device, the CPU count and the library versions.

One `machine_info` for every report that quotes a speed: `fastbyol profile --json` and
benchmarks/ (peers.py, gpu_suite.py). A figure without it cannot be compared with another.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any, Sequence

import torch

MACHINE_KEYS = ("gpu", "gpu_memory_bytes", "cpu_count", "torch", "cuda", "cudnn", "dali", "ffcv", "python",
                "platform", "packages")


def package_version(*names: str, prefix: str | None = None) -> str | None:
    """The installed version of the first distribution found by name, else of the first whose name
    starts with `prefix` (e.g. nvidia-dali-cuda130 for "nvidia-dali"); None when none is installed."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    if prefix:
        for d in importlib.metadata.distributions():
            if (d.metadata["Name"] or "").lower().startswith(prefix):
                return d.version
    return None


def machine_info(device: torch.device, packages: Sequence[str] = ()) -> dict[str, Any]:
    """MACHINE_KEYS for `device`: gpu (its name, or "cpu"), gpu_memory_bytes, cpu_count, the torch /
    CUDA / cuDNN / DALI / FFCV / Python versions (None when absent), the platform, and `packages`:
    {name: version or None} for the distributions named (e.g. a benchmark's peers)."""
    cuda = device.type == "cuda"
    return {
        "gpu": torch.cuda.get_device_name(device) if cuda else "cpu",
        "gpu_memory_bytes": torch.cuda.get_device_properties(device).total_memory if cuda else None,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "dali": package_version(prefix="nvidia-dali"),
        "ffcv": package_version("ffcv"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: package_version(name) for name in packages},
    }


__all__ = ["MACHINE_KEYS", "machine_info", "package_version"]
