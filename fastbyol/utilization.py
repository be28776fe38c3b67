"""Model FLOPs utilization: what the step computes against what the device could.

The FLOPs of one training step are counted once per config by torch's own FlopCounterMode
(matmuls and convolutions, forward and backward; nothing is computed: the model runs on the meta
device). The peak is looked up in a small table of known GPUs for the precision in use;
anything else (a CPU, an unlisted GPU) is "unknown" rather than a guess.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fastbyol.config import Config

# Dense tensor-core peaks in TFLOP/s from the vendors' data sheets: (bf16 / fp16, tf32).
# Matched in this order against torch.cuda.get_device_name (so "H100 PCIe" before "H100").
PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("H200", 989.4, 494.7),
    ("H100 PCIe", 756.0, 378.0),
    ("H100", 989.4, 494.7),  # SXM
    ("A100", 312.0, 156.0),
    ("L40S", 362.05, 183.0),
    ("L4", 121.0, 60.0),
)


def step_flops_per_image(cfg: Config, build_model: Callable[[Config], nn.Module]) -> float:
    """FLOPs of one BYOL training step (online forward + backward on both views, target forward),
    per source image, for the model and crop size of `cfg`; `build_model(cfg)` (fastbyol.step's)
    builds the BYOL module, whose forward on two views returns an output with a `.loss`."""
    rng = torch.get_rng_state()  # building a model may draw from the global RNG; leave it as it was
    try:
        with torch.device("meta"):
            model = build_model(cfg)
        model.train()
        batch = 2  # BatchNorm needs two samples per channel; FLOPs are linear in the batch
        views = [torch.empty(batch, 3, p.crop_size, p.crop_size, device="meta")
                 for p in (cfg.augment.view1, cfg.augment.view2)]
        with FlopCounterMode(display=False) as counter:
            model(*views).loss.backward()
    finally:
        torch.set_rng_state(rng)
    return counter.get_total_flops() / batch


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's peak FLOP/s for `precision` (bf16 | fp16 | fp32), None when unknown.

    fp32 counts at the TF32 peak when cuDNN may use TF32 (torch's default for convolutions,
    which dominate a ResNet), and is unknown otherwise.
    """
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, half, tf32 in PEAK_TFLOPS:
        if key in name:
            if precision in ("bf16", "fp16"):
                return half * 1e12
            return tf32 * 1e12 if torch.backends.cudnn.allow_tf32 else None
    return None


def mfu(flops_per_image: float, images_per_sec_per_device: float, peak: float | None) -> float | None:
    """Achieved model FLOP/s over the peak (a fraction); None when the peak is unknown."""
    if peak is None:
        return None
    return flops_per_image * images_per_sec_per_device / peak


__all__ = ["PEAK_TFLOPS", "mfu", "peak_flops", "step_flops_per_image"]
