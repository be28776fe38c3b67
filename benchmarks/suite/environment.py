"""What the figures depend on: GPU, driver, torch / CUDA / cuDNN, CPUs, versions, optional imports."""

from __future__ import annotations

import subprocess
from typing import Any

import torch

from benchmarks import peers
from benchmarks.suite.context import Context
from fastbyol.machine import machine_info

OPTIONAL = ("ffcv", "nvidia.dali", "lightly", "byol_pytorch", "torchvision")


def environment(ctx: Context) -> dict[str, Any]:
    """Run A: the table's header line, saved first; then which optional packages import here."""
    info = {**machine_info(torch.device(ctx.device), peers.PACKAGES), "driver": None}
    if ctx.cuda:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True)
        info["driver"] = smi.stdout.strip() or smi.stderr.strip()
    ctx.save(info)  # the header line, even if an import below hangs
    for module in OPTIONAL:
        try:
            __import__(module)
            info[f"imports_{module}"] = "ok"
        except Exception as e:  # noqa: BLE001 - a broken install must show here, not as a crash later
            info[f"imports_{module}"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    return info
