"""The BYOL view policy as DALI operators: pipelines/gpu_augment.py's policy, in DALI's graph.

Official semantics (DESIGN.md), exactly: brightness clip(x + δ); contrast clip(f·(x − mean_c)
+ mean_c); saturation and hue in exact HSV (fn.hsv works in YIQ, an approximation): with
v = max_c x and range = v − min_c x, saturation is x' = v − (v − x)·min(f, v / range) and hue
rebuilds x'_c = v − range·clip(min(k_c, 4 − k_c), 0, 1), k_c = (n_c + 6(h + δ)) mod 6,
n = (5, 3, 1); the four jitter ops in a per-image order (one of 24, as a lookup per slot,
DALI `if`: each image computes exactly 4 ops); grayscale weights (0.2989, 0.5870, 0.1140);
blur with the kernel exp(−t²/2σ²) normalized, two separable fn.filter passes with zero padding
(fn.gaussian_blur only mirrors the border); solarize x < t ? x : 1 − x. A coin is a per-image
`if`; p = 0 and p = 1 build no branch. No final clip: every op maps [0, 1] into [0, 1].

Against gpu_augment: the flip comes last, fused into crop_mirror_normalize (every op commutes
with a horizontal flip: per-pixel, per-channel means, symmetric kernel and padding, so the
distribution is the same). DALI fuses no arithmetic (one operator per +, *), so on CPU
operators the exact hue (~40 operators) is about half the augmentation time.

No operator draws a random number: every parameter comes in through external_source, drawn
here in numpy (`draw_views`), a pure function of (seed, epoch, image, view).
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np

from pipelines.crops import sample_crop
from pipelines.policy import GRAY_WEIGHTS, ViewPolicy
from pipelines.seeding import numpy_rng

PERMS = list(itertools.permutations(range(4)))  # 24 orders of (brightness, contrast, sat, hue)
HUE_OFFSETS = (5.0, 3.0, 1.0)  # n_c of the hexcone formula for r, g, b
# Per view: the crop box, then the coins and factors of `view`, in this order in the image's
# stream. Each is one array per batch, leading dimension B (DALI's per-sample arguments).
DRAWS = ("anchor", "shape", "flip", "jitter", "brightness", "contrast", "saturation", "hue", "perm", "gray",
         "blur", "sigma", "solarize")
ON_DEVICE = ("brightness", "contrast", "saturation", "hue")  # multiply the images: on their device


# ---- the per-image random draws: pure functions of (seed, epoch, index, view) -----------------

def used_draws(p: ViewPolicy) -> list[str]:
    """The draws `view` reads for policy `p` (a coin only when 0 < p < 1, a factor only when its
    op can run): DALI wants no unused external_source output."""
    used = {"anchor": True, "shape": True, "flip": p.flip_p > 0, "jitter": 0 < p.jitter_p < 1,
            "perm": p.jitter_p > 0, "gray": 0 < p.grayscale_p < 1,
            "blur": p.kernel_size() > 1 and 0 < p.blur_p < 1, "sigma": p.kernel_size() > 1 and p.blur_p > 0,
            "solarize": 0 < p.solarize_p < 1}
    for name in ON_DEVICE:
        used[name] = p.jitter_p > 0 and getattr(p, name) > 0
    return [name for name in DRAWS if used[name]]


def draw_views(seed: int, epoch: int, indices: Sequence[int], view: int, p: ViewPolicy,
               heights: np.ndarray, widths: np.ndarray, sampler: str = "official") -> dict[str, np.ndarray]:
    """View `view` (1 or 2) of images `indices` in `epoch`, one array per draw, row i for image
    indices[i]: its crop box (anchor = (top, left), shape = (h, w), pixels, float32 (B, 2); the
    box pipelines/folder.py draws for the same key), then 11 uniforms u of the same stream
    numpy_rng(seed, epoch, index, view) mapped to the policy's coins and factors (B,)."""
    n = len(indices)
    boxes = np.empty((n, 4), np.float32)
    u = np.empty((n, 11))
    for row, index in enumerate(indices):
        rng = numpy_rng(seed, epoch, int(index), view)
        boxes[row] = sample_crop(rng, int(heights[index]), int(widths[index]), p.crop_scale, p.crop_ratio, sampler)
        u[row] = rng.random(11)
    f32 = np.float32
    lo, hi = p.blur_sigma
    return {
        "anchor": np.ascontiguousarray(boxes[:, :2]), "shape": np.ascontiguousarray(boxes[:, 2:]),
        "flip": (u[:, 0] < p.flip_p).astype(np.int32), "jitter": u[:, 1] < p.jitter_p,
        "brightness": (p.brightness * (2 * u[:, 2] - 1)).astype(f32),
        "contrast": (1 + p.contrast * (2 * u[:, 3] - 1)).astype(f32),
        "saturation": (1 + p.saturation * (2 * u[:, 4] - 1)).astype(f32),
        "hue": (p.hue * (2 * u[:, 5] - 1)).astype(f32),
        "perm": np.minimum((u[:, 6] * len(PERMS)).astype(np.int64), len(PERMS) - 1).astype(np.int32),
        "gray": u[:, 7] < p.grayscale_p,
        "blur": u[:, 8] < p.blur_p,
        "sigma": (lo + (hi - lo) * u[:, 9]).astype(f32),
        "solarize": u[:, 10] < p.solarize_p,
    }


# ---- the operators (traced by DALI's autograph: `if` on a DataNode is per-sample) -----------

def brightness(x: Any, delta: Any) -> Any:
    import nvidia.dali.math as dmath

    return dmath.clamp(x + delta, 0.0, 1.0)


def contrast(x: Any, factor: Any) -> Any:
    import nvidia.dali.math as dmath
    from nvidia.dali import fn

    mean = fn.reductions.mean(x, axes=[0, 1])  # (3,): each channel's spatial mean
    return dmath.clamp(factor * (x - mean) + mean, 0.0, 1.0)


def _value_range(x: Any) -> tuple[Any, Any]:
    """HSV v = max_c x and range = v − min_c x, each (H, W, 1)."""
    from nvidia.dali import fn

    v = fn.reductions.max(x, axes=[2], keep_dims=True)
    return v, v - fn.reductions.min(x, axes=[2], keep_dims=True)


def saturation(x: Any, factor: Any) -> Any:
    """HSV s·factor clipped to 1, h and v kept: x' = v − (v − x)·min(factor, v / range)."""
    import nvidia.dali.math as dmath

    v, rng = _value_range(x)
    # range = 0 (gray pixel) has v − x = 0: any finite gain leaves it unchanged
    gain = dmath.min(factor, v / dmath.max(rng, 1e-12))
    return v - (v - x) * gain


def hue(x: Any, delta: Any) -> Any:
    """HSV h + delta (turns, mod 1), s and v kept, rebuilt with the hexcone formula."""
    import nvidia.dali.math as dmath
    from nvidia.dali import types

    v, rng = _value_range(x)
    r, g, b = x[:, :, 0:1], x[:, :, 1:2], x[:, :, 2:3]
    inv = 1.0 / dmath.max(rng, 1e-12)  # gray pixels: numerators are 0, so h = 0
    is_r, is_g = r == v, g == v
    # h in sixths of a turn; ties pick r, then g (equal values there anyway)
    h6 = is_r * ((g - b) * inv) + (1 - is_r) * (
        is_g * ((b - r) * inv + 2.0) + (1 - is_g) * ((r - g) * inv + 4.0)
    )
    h6 = h6 + 6.0 * delta
    k = h6 + types.Constant(np.array(HUE_OFFSETS, dtype=np.float32))  # (H, W, 3)
    k = k - 6.0 * dmath.floor(k / 6.0)
    return v - rng * dmath.clamp(dmath.min(k, 4.0 - k), 0.0, 1.0)


def jitter(x: Any, p: ViewPolicy, r: dict[str, Any]) -> Any:
    """The four jitter ops in the per-image order r["perm"], each followed by a clip."""
    from nvidia.dali import fn, types

    for slot in range(4):
        op = fn.lookup_table(
            r["perm"], keys=list(range(len(PERMS))), values=[order[slot] for order in PERMS],
            dtype=types.INT32,
        )
        # strength 0 is the identity (x is already in [0, 1]): no op, no branch
        if op == 0:
            if p.brightness > 0:
                x = brightness(x, r["brightness"])
        elif op == 1:
            if p.contrast > 0:
                x = contrast(x, r["contrast"])
        elif op == 2:
            if p.saturation > 0:
                x = saturation(x, r["saturation"])
        else:
            if p.hue > 0:
                x = hue(x, r["hue"])
    return x


def grayscale(x: Any) -> Any:
    from nvidia.dali import fn, types

    weights = types.Constant(np.array(GRAY_WEIGHTS, dtype=np.float32))
    y = fn.reductions.sum(x * weights, axes=[2], keep_dims=True)
    return fn.cat(y, y, y, axis=2)


def blur(x: Any, sigma: Any, k: int) -> Any:
    """Separable Gaussian of per-image `sigma` (pixels, CPU), odd side k, zero padding."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    t = types.Constant(np.arange(-(k // 2), k // 2 + 1, dtype=np.float32))
    w = dmath.exp(-(t * t) / (2.0 * sigma * sigma))
    w = w / fn.reductions.sum(w)
    x = fn.filter(x, fn.reshape(w, shape=[k, 1]), border="constant")
    return fn.filter(x, fn.reshape(w, shape=[1, k]), border="constant")


def solarize(x: Any, threshold: float) -> Any:
    return x + (x >= threshold) * (1.0 - 2.0 * x)


def view(crop: Any, p: ViewPolicy, mean: Sequence[float], std: Sequence[float], r: dict[str, Any]) -> Any:
    """One view from a uint8 HWC crop: float HWC, normalized, flipped when r["flip"].

    `r` holds this view's per-sample draws (`draw_views`) as DataNodes. Each step with p = 0
    builds nothing, p = 1 runs on every image, else a per-image `if` on its coin.
    """
    from nvidia.dali import fn, types

    x = crop * (1.0 / 255.0)  # float32 in [0, 1]
    if 0 < p.jitter_p < 1:
        if r["jitter"]:
            x = jitter(x, p, r)
    elif p.jitter_p >= 1:
        x = jitter(x, p, r)
    if 0 < p.grayscale_p < 1:
        if r["gray"]:
            x = grayscale(x)
    elif p.grayscale_p >= 1:
        x = grayscale(x)
    k = p.kernel_size()
    if k > 1 and 0 < p.blur_p < 1:
        if r["blur"]:
            x = blur(x, r["sigma"], k)
    elif k > 1 and p.blur_p >= 1:
        x = blur(x, r["sigma"], k)
    if 0 < p.solarize_p < 1:
        if r["solarize"]:
            x = solarize(x, p.solarize_threshold)
    elif p.solarize_p >= 1:
        x = solarize(x, p.solarize_threshold)
    # The flip commutes with everything above (see the module docstring), so it is fused here.
    mirror = r["flip"] if p.flip_p > 0 else 0
    return fn.crop_mirror_normalize(
        x, mirror=mirror, mean=list(mean), std=list(std), dtype=types.FLOAT, output_layout="HWC"
    )
