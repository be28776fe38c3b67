"""Random-resized-crop boxes, in plain numpy: the official BYOL sampler and torchvision's.

official: one draw of area fraction ~ U[scale] and aspect ratio (w / h) log-uniform in `ratio`;
the box is clamped into the image and placed uniformly at random (deepmind-research
byol/utils/dataset.py, _decode_and_random_crop). torchvision: RandomResizedCrop.get_params, up to
10 draws and a centred fallback. Kept free of torch and PIL so the folder loader and the FFCV
decoder (numba, pipelines.ffcv_decode) draw the same boxes.
"""

from __future__ import annotations

import math

import numpy as np

ATTEMPTS = 10  # torchvision's number of tries before the center-crop fallback
CROP_SAMPLERS = ("official", "torchvision")


def sample_crop(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    sampler: str = "official",
) -> tuple[int, int, int, int]:
    """A random crop box (top, left, h, w), in pixels, inside a `height` x `width` image.

    sampler "official": one draw of the area fraction ~ U[scale] and of the aspect ratio (w / h)
    log-uniform in `ratio`; w and h are rounded, clamped to the image (at least 1 pixel), and the
    box placed uniformly at random. The clamp makes the box's ratio and area differ from the draw
    when it does not fit; the official code accepts that rather than redrawing.

    sampler "torchvision": up to 10 tries draw an area fraction ~ U[scale] and an aspect ratio (w / h) log-uniform in
    `ratio`; the first box that fits is placed uniformly at random. When none fits, the fallback
    is the largest centered box whose ratio is clamped to `ratio` (torchvision's behaviour).
    """
    if height < 1 or width < 1:
        raise ValueError(f"sample_crop: image size {height}x{width}: expected at least 1x1 pixels")
    if sampler not in CROP_SAMPLERS:
        raise ValueError(f"crop_sampler = {sampler!r}: expected one of {', '.join(CROP_SAMPLERS)}")
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    if sampler == "official":
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = min(width, max(1, int(round(math.sqrt(target_area * aspect)))))
        h = min(height, max(1, int(round(math.sqrt(target_area / aspect)))))
        top = int(rng.integers(0, height - h + 1))
        left = int(rng.integers(0, width - w + 1))
        return top, left, h, w
    for _ in range(ATTEMPTS):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w

    in_ratio = width / height
    if in_ratio < min(ratio):  # too tall: keep the full width
        w = width
        h = min(height, max(1, int(round(w / min(ratio)))))
    elif in_ratio > max(ratio):  # too wide: keep the full height
        h = height
        w = min(width, max(1, int(round(h * max(ratio)))))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w
