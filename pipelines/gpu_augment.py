"""Batched, per-sample-random BYOL view augmentations in torch, on any device.

Input: crops already at the policy's size, float in [0, 1]. Output: one view, with the official
BYOL semantics (DESIGN.md, deepmind-research byol/utils/augmentations.py), in this order:
flip; color jitter (brightness, contrast, saturation, hue in a random order per image, each
followed by a clip); grayscale; Gaussian blur; solarize; a final clip.

Every random number of a batch comes from one `torch.rand(B, 14)` on the caller's generator, so a
seed fixes the view. Per-sample choices are `torch.where` masks and per-sample parameters, never
Python branches on data, boolean indexing or `.item()`: no host-device sync and static shapes.
Only the policy (Python numbers) selects code paths, e.g. solarize is skipped when
`solarize_p == 0`. `apply_params` compiles with `torch.compile(fullgraph=True)`; `torch.rand`
with an explicit Generator is a graph break for dynamo, so compile `apply_params` and call
`draw_params` eagerly (one small kernel).

How the random jitter order stays cheap: brightness and contrast are per-channel affine maps
("A" stages); saturation and hue both keep HSV v and commute with each other, so they are one
"X" stage x' = v - min(f·range, v)·(1 - d_c(h + delta)) that needs no full HSV round trip.
Every order of {A, A, X, X} (adjacent X's merged) is a subsequence of X A X A X, so five stages
(two affine, three HSV) reproduce all 24 orders; the naive per-slot way needs eight.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pipelines.policy import GRAY_WEIGHTS, AugmentConfig, ViewPolicy
from pipelines.seeding import generator as keyed_generator

# Columns of the one (B, 14) uniform draw; the order is part of the reproducibility contract.
_FLIP, _JITTER, _ORDER, _BRIGHT, _CONTRAST, _SAT, _HUE, _GRAY, _BLUR, _SIGMA, _SOLAR = (
    0, 1, 2, 6, 7, 8, 9, 10, 11, 12, 13
)
_NUM_DRAWS = 14
# Jitter ops, as indices into ViewParams.order.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


class ViewParams(NamedTuple):
    """Per-sample random parameters of one view; every field has leading dimension B."""

    flip: Tensor  # (B,) bool
    jitter: Tensor  # (B,) bool: apply the four jitter ops
    order: Tensor  # (B, 4) int64: position 0..3 of brightness, contrast, saturation, hue
    brightness: Tensor  # (B,) additive delta
    contrast: Tensor  # (B,) factor
    saturation: Tensor  # (B,) factor on HSV s
    hue: Tensor  # (B,) delta on HSV h, in turns
    gray: Tensor  # (B,) bool
    blur: Tensor  # (B,) bool
    sigma: Tensor  # (B,) blur sigma, pixels
    solarize: Tensor  # (B,) bool


def draw_params(
    batch: int, policy: ViewPolicy, generator: torch.Generator, device: torch.device | str
) -> ViewParams:
    """Draw the parameters of `batch` views from `generator` (on `device`) with one torch.rand.

    All 14 columns are drawn whatever the policy, so the stream does not depend on which ops
    are enabled. A probability p applies an op when u < p (never for p = 0, always for p = 1).
    """
    u = torch.rand(batch, _NUM_DRAWS, generator=generator, device=device, dtype=torch.float32)

    def signed(col: int, strength: float) -> Tensor:  # U[-strength, strength]
        return (2.0 * u[:, col] - 1.0) * strength

    lo, hi = policy.blur_sigma
    return ViewParams(
        flip=u[:, _FLIP] < policy.flip_p,
        jitter=u[:, _JITTER] < policy.jitter_p,
        order=_positions(u[:, _ORDER:_ORDER + 4]),
        brightness=signed(_BRIGHT, policy.brightness),
        contrast=1.0 + signed(_CONTRAST, policy.contrast),
        saturation=1.0 + signed(_SAT, policy.saturation),
        hue=signed(_HUE, policy.hue),
        gray=u[:, _GRAY] < policy.grayscale_p,
        blur=u[:, _BLUR] < policy.blur_p,
        sigma=lo + (hi - lo) * u[:, _SIGMA],
        solarize=u[:, _SOLAR] < policy.solarize_p,
    )


def _positions(keys: Tensor) -> Tensor:
    """(B, n) int64: the rank of each key in its row, a uniform permutation for uniform keys.

    Exact ties (float32 draws do tie, over millions of images) go to the lower column first,
    so each row stays a permutation; no sort, no sync.
    """
    col = torch.arange(keys.shape[1], device=keys.device)
    earlier = (keys[:, None, :] < keys[:, :, None]) | (
        (keys[:, None, :] == keys[:, :, None]) & (col[None, :] < col[:, None])
    )
    return earlier.sum(-1)


def _per_sample(t: Tensor) -> Tensor:
    return t.view(-1, 1, 1, 1)


def _brightness(x: Tensor, delta: Tensor) -> Tensor:
    """clip(x + delta) with delta (B,) shared by the three channels."""
    return (x + _per_sample(delta)).clamp_(0.0, 1.0)


def _contrast(x: Tensor, factor: Tensor) -> Tensor:
    """clip(f·(x − mean_c) + mean_c), mean_c each channel's spatial mean; factor (B,)."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    return (_per_sample(factor) * (x - mean) + mean).clamp_(0.0, 1.0)


def _affine_stage(x: Tensor, use_contrast: Tensor, delta: Tensor, factor: Tensor) -> Tensor:
    """Per image either brightness (delta) or contrast (factor), as one clip(a·x + b) pass."""
    mean = x.mean(dim=(2, 3), keepdim=True)  # (B, 3, 1, 1); unused by brightness images
    c = _per_sample(use_contrast)
    f = _per_sample(factor)
    scale = torch.where(c, f, 1.0)
    # brightness: 1·x + delta = x + delta exactly; contrast: f·x + (1 − f)·mean
    shift = torch.where(c, (1.0 - f) * mean, _per_sample(delta))
    return torch.addcmul(shift, scale, x).clamp_(0.0, 1.0)


def _hsv(x: Tensor, saturation: Tensor, hue: Tensor) -> Tensor:
    """Scale HSV s by `saturation` (then clip to [0, 1]) and add `hue` (turns) to h, mod 1.

    x (B, 3, H, W) in [0, 1]; saturation, hue (B,). In the HSV hexcone, channel c of a pixel is
    x_c = (v − chroma) + chroma·clip(|a − 3| − 1, 0, 1) with v = max, chroma = max − min = v·s,
    a = |6h − 2c| and 6h in [0, 6). Saturation only changes chroma, to v·clip(f·s, 0, 1) =
    min(f·chroma, v); hue only changes h; v stays. So only h needs a division and there is no
    full HSV round trip. The output stays in [0, v].
    """
    r, g, b = x.unbind(1)
    v = torch.maximum(torch.maximum(r, g), b)
    chroma = v - torch.minimum(torch.minimum(r, g), b)
    # 6h·chroma by which channel is the max (ties give the same h, the hexcone is continuous);
    # a gray pixel (chroma 0) has numerator 0, so any positive divisor gives h = 0 there.
    h6 = torch.where(v == g, (b - r).add_(chroma, alpha=2.0), (r - g).add_(chroma, alpha=4.0))
    h6 = torch.where(v == r, g - b, h6)
    h6.div_(chroma.clamp_min(1e-12)).add_(6.0 * hue.view(-1, 1, 1))
    h6.sub_(torch.floor(h6 * (1.0 / 6.0)), alpha=6.0)  # into [0, 6), up to rounding
    chroma = torch.minimum(saturation.view(-1, 1, 1) * chroma, v)
    centers = torch.arange(0, 6, 2, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    # |a − 3| − 1 with a = |6h − 2c| in [0, 6]: 2 − (distance on the circle) of hue to channel c
    w = (h6.unsqueeze(1) - centers).abs_().sub_(3.0).abs_().sub_(1.0).clamp_(0.0, 1.0)
    return torch.addcmul((v - chroma).unsqueeze(1), chroma.unsqueeze(1), w, out=w)


def _jitter(x: Tensor, p: ViewParams, policy: ViewPolicy) -> Tensor:
    """The four jitter ops in each image's order (p.order), as stages X A X A X (see top)."""
    pos = p.order
    contrast_first = pos[:, CONTRAST] < pos[:, BRIGHTNESS]
    # An X op's stage is 2 × the number of A ops before it: 0, 2 or 4.
    n_affine_before = (pos[:, :CONTRAST + 1, None] < pos[:, None, SATURATION:]).sum(1)
    x_stage = 2 * n_affine_before  # (B, 2): stage of saturation, hue
    use_affine = policy.brightness > 0 or policy.contrast > 0
    use_hsv = policy.saturation > 0 or policy.hue > 0
    for stage in range(5):
        if stage % 2 and use_affine:
            use_c = contrast_first if stage == 1 else ~contrast_first
            x = _affine_stage(x, use_c, p.brightness, p.contrast)
        elif stage % 2 == 0 and use_hsv:
            here = x_stage == stage
            sat = torch.where(here[:, 0], p.saturation, 1.0)
            hue = torch.where(here[:, 1], p.hue, 0.0)
            x = _hsv(x, sat, hue)
    return x


def _grayscale(x: Tensor) -> Tensor:
    """(B, 1, H, W) luma with the official weights; broadcasts back to 3 channels."""
    wr, wg, wb = GRAY_WEIGHTS
    return wr * x[:, 0:1] + wg * x[:, 1:2] + wb * x[:, 2:3]


def _blur(x: Tensor, sigma: Tensor, k: int) -> Tensor:
    """Separable Gaussian blur, per-sample sigma (B,) in pixels, odd side k, zero padding.

    The 1D kernel exp(−t²/2σ²), t = −k//2 … k//2, normalized to sum 1, runs as two grouped
    convolutions over (1, B·3, H, W) with one filter per image and channel.
    """
    n, c, hgt, wid = x.shape
    radius = k // 2
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    w = torch.exp(-(t * t) / (2.0 * sigma[:, None].float() ** 2))
    w = (w / w.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B·3, k)
    y = x.reshape(1, n * c, hgt, wid)
    # On CPU, oneDNN's depthwise convolution is 3-4x faster on channels_last, copies included
    # (measured); CUDA keeps the NCHW layout the rest of this module works in.
    cpu = x.device.type == "cpu"
    if cpu:
        y = y.contiguous(memory_format=torch.channels_last)
    y = F.conv2d(y, w.view(n * c, 1, k, 1), padding=(radius, 0), groups=n * c)
    y = F.conv2d(y, w.view(n * c, 1, 1, k), padding=(0, radius), groups=n * c)
    if cpu:
        y = y.contiguous()
    return y.view(n, c, hgt, wid)


def apply_params(x: Tensor, p: ViewParams, policy: ViewPolicy) -> Tensor:
    """Make one view of x (B, 3, H, W) float32 in [0, 1] with explicit parameters p.

    Images that an op does not select pass through it bit-for-bit unchanged.
    """
    if x.shape[0] == 0:  # a grouped convolution needs at least one group
        return x.clone()
    if policy.flip_p > 0:
        x = torch.where(_per_sample(p.flip), x.flip(-1), x)
    if policy.jitter_p > 0:
        x = torch.where(_per_sample(p.jitter), _jitter(x, p, policy), x)
    if policy.grayscale_p > 0:
        x = torch.where(_per_sample(p.gray), _grayscale(x), x)
    k = policy.kernel_size()
    if policy.blur_p > 0 and k > 1:
        x = torch.where(_per_sample(p.blur), _blur(x, p.sigma, k), x)
    if policy.solarize_p > 0:
        solar = _per_sample(p.solarize) & (x >= policy.solarize_threshold)
        x = torch.where(solar, 1.0 - x, x)
    return x.clamp(0.0, 1.0)


def _check(x: Tensor, policy: ViewPolicy, generator: torch.Generator) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"images of shape {tuple(x.shape)}: expected (B, 3, H, W)")
    side = policy.crop_size
    if x.shape[2] != side or x.shape[3] != side:
        raise ValueError(
            f"images of side {x.shape[2]}x{x.shape[3]} but policy crop_size = {side}: the blur "
            f"kernel follows crop_size, so crop to it (or set it with AugmentConfig.set_crop_size)"
        )
    if generator.device.type != x.device.type:
        raise ValueError(
            f"generator on {generator.device} but images on {x.device}: expected the same device"
        )


def augment(x: Tensor, policy: ViewPolicy, generator: torch.Generator) -> Tensor:
    """One BYOL view of each image of x, with independent random parameters per image.

    x: (B, 3, S, S) float in [0, 1], S = policy.crop_size, on any device; generator: on
    x's device. Returns float in [0, 1] of x's shape and dtype (math in float32). The same
    generator state gives the same output.
    """
    _check(x, policy, generator)
    params = draw_params(x.shape[0], policy, generator, x.device)
    y = apply_params(x.to(torch.float32).contiguous(), params, policy)
    return y.to(x.dtype)


def make_view(
    images: Tensor,
    policy: ViewPolicy,
    generator: torch.Generator,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The model's input for one view: augment, then (x − mean) / std per channel.

    images: (B, 3, S, S) uint8 (0…255) or float in [0, 1], any memory format, on the target
    device; mean, std: 3 values each, in [0, 1] units. Returns (B, 3, S, S) of `dtype` in
    channels_last memory format.
    """
    if images.dtype == torch.uint8:
        x = images.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)
    elif images.is_floating_point():
        x = images.to(torch.float32, memory_format=torch.contiguous_format)
    else:
        raise ValueError(f"images of dtype {images.dtype}: expected uint8 or floating point")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean = {tuple(mean)}, std = {tuple(std)}: expected 3 values each")
    x = augment(x, policy, generator)  # a fresh float32 tensor, safe to modify in place
    # Per-channel Python scalars rather than a mean/std tensor: building one on a GPU would be
    # a host-to-device copy, which synchronizes.
    for c in range(3):
        x[:, c].sub_(mean[c]).div_(std[c])
    return x.to(dtype, memory_format=torch.channels_last)


def make_views(crops: tuple[Tensor, Tensor], augment: AugmentConfig, seed: int, epoch: int, step: int,
               rank: int) -> tuple[Tensor, Tensor]:
    """Both views of one step from their crops, (B, 3, S, S) each, already on the device.

    View k's draws come from generator(seed, epoch, step, k, rank): a pure function of the step,
    and rank is a key so that ranks do not share augmentation draws row by row.
    """
    policies = (augment.view1, augment.view2)
    view1, view2 = (
        make_view(x, policy, keyed_generator(x.device, seed, epoch, step, k, rank), augment.mean, augment.std)
        for k, (x, policy) in enumerate(zip(crops, policies), start=1)
    )
    return view1, view2
