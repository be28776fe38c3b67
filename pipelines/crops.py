"""Random-resized-crop boxes: torchvision's RandomResizedCrop.get_params, in plain numpy.

Kept free of torch and PIL so the folder loader and the FFCV decoder (numba) draw the same boxes.
"""

from __future__ import annotations

import math

import numpy as np

ATTEMPTS = 10  # torchvision's number of tries before the center-crop fallback


def sample_crop(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
    """A random crop box (top, left, h, w), in pixels, inside a `height` x `width` image.

    Up to 10 tries draw an area fraction ~ U[scale] and an aspect ratio (w / h) log-uniform in
    `ratio`; the first box that fits is placed uniformly at random. When none fits, the fallback
    is the largest centered box whose ratio is clamped to `ratio` (torchvision's behaviour).
    """
    if height < 1 or width < 1:
        raise ValueError(f"sample_crop: image size {height}x{width}: expected at least 1x1 pixels")
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
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
