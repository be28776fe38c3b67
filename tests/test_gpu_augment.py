"""pipelines.gpu_augment against the BYOL definitions (DESIGN.md), each computed another way here:
colorsys per pixel for saturation and hue, a plain loop for the zero-padded blur, the direct
formulas for the rest, and counts over a few thousand tiny images for the probabilities.
"""

from __future__ import annotations

import colorsys
import itertools
import math

import numpy as np
import pytest
import torch

from pipelines import gpu_augment as ga
from pipelines.policy import IMAGENET_MEAN, IMAGENET_STD, ViewPolicy, view1_policy, view2_policy

SIDE = 8
ATOL = 1e-5


def only(**kw) -> ViewPolicy:
    """A policy at SIDE pixels with every op off except those given."""
    base = dict(
        crop_size=SIDE, flip_p=0.0, jitter_p=0.0, brightness=0.0, contrast=0.0, saturation=0.0,
        hue=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0,
    )
    base.update(kw)
    return ViewPolicy(**base)


def images(n: int, side: int = SIDE, seed: int = 0) -> torch.Tensor:
    """Random colored images; the first gets gray, black, white, primaries and tied channels."""
    x = torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed))
    special = [
        (0, 0, 0), (1, 1, 1), (0.5, 0.5, 0.5), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0),
        (0.3, 0.3, 0.7), (0.7, 0.7, 0.2), (0.2, 0.9, 0.9), (0.9, 0.2, 0.9), (0.02, 0.97, 0.5),
    ]
    for i, px in enumerate(special[: side * side]):
        x[0, :, i // side, i % side] = torch.tensor(px)
    return x


def params(n: int, **kw) -> ga.ViewParams:
    """Explicit parameters: no op selected, identity values, order B, C, S, H; override by kw."""
    off = torch.zeros(n, dtype=torch.bool)
    base = dict(
        flip=off, jitter=off, order=torch.arange(4).repeat(n, 1), brightness=torch.zeros(n),
        contrast=torch.ones(n), saturation=torch.ones(n), hue=torch.zeros(n), gray=off,
        blur=off, sigma=torch.ones(n), solarize=off,
    )
    base.update(kw)
    return ga.ViewParams(**base)


# ---- single-image references, float64 numpy, image (3, H, W) --------------------------------


def ref_brightness(img: np.ndarray, delta: float) -> np.ndarray:
    return np.clip(img + delta, 0, 1)


def ref_contrast(img: np.ndarray, f: float) -> np.ndarray:
    mean = img.mean(axis=(1, 2), keepdims=True)
    return np.clip(f * (img - mean) + mean, 0, 1)


def _per_pixel(img: np.ndarray, fn) -> np.ndarray:
    out = np.empty_like(img)
    for i in range(img.shape[1]):
        for j in range(img.shape[2]):
            out[:, i, j] = fn(*colorsys.rgb_to_hsv(*img[:, i, j]))
    return np.clip(out, 0, 1)


def ref_saturation(img: np.ndarray, f: float) -> np.ndarray:
    return _per_pixel(img, lambda h, s, v: colorsys.hsv_to_rgb(h, min(max(s * f, 0), 1), v))


def ref_hue(img: np.ndarray, delta: float) -> np.ndarray:
    return _per_pixel(img, lambda h, s, v: colorsys.hsv_to_rgb((h + delta) % 1.0, s, v))


def ref_gray(img: np.ndarray) -> np.ndarray:
    y = 0.2989 * img[0] + 0.5870 * img[1] + 0.1140 * img[2]
    return np.stack([y, y, y])


def ref_blur(img: np.ndarray, sigma: float, k: int) -> np.ndarray:
    r = k // 2
    w = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma**2))
    w /= w.sum()
    c, hgt, wid = img.shape
    tmp = np.zeros_like(img)
    for i in range(hgt):  # vertical pass; outside the image counts as 0
        for t in range(-r, r + 1):
            if 0 <= i + t < hgt:
                tmp[:, i] += w[t + r] * img[:, i + t]
    out = np.zeros_like(img)
    for j in range(wid):
        for t in range(-r, r + 1):
            if 0 <= j + t < wid:
                out[:, :, j] += w[t + r] * tmp[:, :, j + t]
    return out


def ref_solarize(img: np.ndarray, t: float) -> np.ndarray:
    return np.where(img < t, img, 1 - img)


REF_OPS = {
    ga.BRIGHTNESS: lambda img, p, i: ref_brightness(img, float(p.brightness[i])),
    ga.CONTRAST: lambda img, p, i: ref_contrast(img, float(p.contrast[i])),
    ga.SATURATION: lambda img, p, i: ref_saturation(img, float(p.saturation[i])),
    ga.HUE: lambda img, p, i: ref_hue(img, float(p.hue[i])),
}


def ref_jitter(img: np.ndarray, p: ga.ViewParams, i: int) -> np.ndarray:
    """The four ops one after the other, in image i's order (position of each op)."""
    for op in np.argsort(p.order[i].numpy()):
        img = REF_OPS[int(op)](img, p, i)
    return img


def close(a: torch.Tensor, b: np.ndarray, atol: float = ATOL) -> None:
    np.testing.assert_allclose(a.double().numpy(), b, rtol=0, atol=atol)


# ---- each op with explicit parameters --------------------------------------------------------


def test_brightness_and_contrast_match_formulas():
    x = images(4, 5)
    delta = torch.tensor([-0.4, -0.05, 0.2, 0.4])
    factor = torch.tensor([0.6, 0.9, 1.15, 1.4])
    use_c = torch.tensor([True, False, True, False])
    out_b, out_c = ga._brightness(x, delta), ga._contrast(x, factor)
    out_stage = ga._affine_stage(x, use_c, delta, factor)
    for i in range(4):
        img = x[i].double().numpy()
        close(out_b[i], ref_brightness(img, float(delta[i])))
        close(out_c[i], ref_contrast(img, float(factor[i])))
        b, c = ref_brightness(img, float(delta[i])), ref_contrast(img, float(factor[i]))
        close(out_stage[i], c if use_c[i] else b)


def test_saturation_matches_colorsys():
    x = images(4, 5, seed=1)
    factor = torch.tensor([0.0, 0.8, 1.2, 2.0])  # U[0.8, 1.2] by default; 0 and 2 test the clip
    out = ga._hsv(x, factor, torch.zeros(4))
    for i in range(4):
        close(out[i], ref_saturation(x[i].double().numpy(), float(factor[i])))


def test_hue_matches_colorsys():
    x = images(5, 5, seed=2)
    delta = torch.tensor([-0.5, -0.1, 0.03, 0.1, 0.37])
    out = ga._hsv(x, torch.ones(5), delta)
    for i in range(5):
        close(out[i], ref_hue(x[i].double().numpy(), float(delta[i])))


def test_saturation_and_hue_in_one_stage_equal_either_order():
    x = images(3, 5, seed=3)
    factor, delta = torch.tensor([0.8, 1.2, 1.7]), torch.tensor([0.1, -0.07, 0.45])
    out = ga._hsv(x, factor, delta)
    for i in range(3):
        img, f, d = x[i].double().numpy(), float(factor[i]), float(delta[i])
        close(out[i], ref_hue(ref_saturation(img, f), d))
        close(out[i], ref_saturation(ref_hue(img, d), f))


def test_jitter_applies_every_one_of_the_24_orders():
    perms = list(itertools.permutations(range(4)))
    n = len(perms)
    x = images(n, 5, seed=4)
    x[:, :, :2] = x[:, :, :2] * 0.1 + 0.9  # bright rows, so that brightness and contrast clip
    g = torch.Generator().manual_seed(5)
    p = params(
        n,
        order=torch.tensor([[seq.index(op) for op in range(4)] for seq in perms]),
        brightness=(torch.rand(n, generator=g) * 2 - 1) * 0.4,
        contrast=0.6 + 0.8 * torch.rand(n, generator=g),
        saturation=0.8 + 0.4 * torch.rand(n, generator=g),
        hue=(torch.rand(n, generator=g) * 2 - 1) * 0.1,
    )
    policy = ViewPolicy(crop_size=5)
    out = ga._jitter(x, p, policy)
    for i in range(n):
        close(out[i], ref_jitter(x[i].double().numpy(), p, i))


def test_blur_matches_zero_padded_loop():
    x = images(3, 7, seed=6)
    sigma = torch.tensor([0.1, 0.9, 2.0])
    for k in (3, 5, 23):  # 23 > 7: most of the kernel falls on the zero padding
        out = ga._blur(x, sigma, k)
        for i in range(3):
            close(out[i], ref_blur(x[i].double().numpy(), float(sigma[i]), k))


def test_flip_gray_solarize_follow_formulas_and_masks():
    x = images(4)
    mask = torch.tensor([True, False, True, False])
    policy = only(flip_p=0.5, grayscale_p=0.5, solarize_p=0.5, solarize_threshold=0.4)
    for name, ref in (
        ("flip", lambda img: img[:, :, ::-1]),
        ("gray", ref_gray),
        ("solarize", lambda img: ref_solarize(img, 0.4)),
    ):
        out = ga.apply_params(x, params(4, **{name: mask}), policy)
        for i in range(4):
            if mask[i]:
                close(out[i], ref(x[i].double().numpy()))
            else:
                assert torch.equal(out[i], x[i]), name


def test_unselected_images_pass_through_unchanged():
    x = images(6)
    p = params(6, order=torch.tensor([3, 1, 0, 2]).repeat(6, 1), brightness=torch.full((6,), 0.3),
               contrast=torch.full((6,), 1.3), saturation=torch.full((6,), 1.2),
               hue=torch.full((6,), 0.1), sigma=torch.full((6,), 1.5))
    full = ViewPolicy(crop_size=SIDE, flip_p=0.5, jitter_p=0.8, grayscale_p=0.2, blur_p=0.5,
                      blur_kernel=3, solarize_p=0.5)
    assert torch.equal(ga.apply_params(x, p, full), x)
    jittered = ga.apply_params(x, p._replace(jitter=torch.tensor([True] * 3 + [False] * 3)), full)
    assert torch.equal(jittered[3:], x[3:])
    assert not torch.allclose(jittered[:3], x[:3])


# ---- augment(): the draws and the probabilities ----------------------------------------------


def test_augment_is_apply_params_of_draw_params():
    x, policy = images(16), view2_policy()
    policy.crop_size, policy.blur_kernel, policy.blur_p = SIDE, 3, 0.5
    out = ga.augment(x, policy, torch.Generator().manual_seed(7))
    p = ga.draw_params(16, policy, torch.Generator().manual_seed(7), "cpu")
    assert torch.equal(out, ga.apply_params(x, p, policy))


def test_drawn_parameters_have_the_policy_distributions():
    n, policy = 24000, view1_policy()
    p = ga.draw_params(n, policy, torch.Generator().manual_seed(8), "cpu")
    for values, lo, hi in (
        (p.brightness, -0.4, 0.4), (p.contrast, 0.6, 1.4), (p.saturation, 0.8, 1.2),
        (p.hue, -0.1, 0.1), (p.sigma, 0.1, 2.0),
    ):
        margin = 0.01 * (hi - lo)
        assert lo <= values.min() < lo + margin and hi - margin < values.max() <= hi
        # mean of U[lo, hi] within 4 standard errors
        assert abs(values.mean().item() - (lo + hi) / 2) < 4 * (hi - lo) / math.sqrt(12 * n)
    assert torch.equal(p.order.sort(dim=1).values, torch.arange(4).expand(n, 4))
    code = (p.order * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(code, minlength=256)[counts_index()]
    assert len(counts) == 24 and (counts - n / 24).abs().max() < 4 * math.sqrt(n / 24)


def test_order_positions_are_permutations_even_with_tied_keys():
    keys = torch.tensor([[0.3, 0.1, 0.9, 0.5], [0.2, 0.2, 0.2, 0.2], [0.7, 0.1, 0.7, 0.1]])
    want = [[1, 0, 3, 2], [0, 1, 2, 3], [2, 0, 3, 1]]
    assert ga._positions(keys).tolist() == want


def counts_index() -> torch.Tensor:
    return torch.tensor([sum(q * 4 ** (3 - i) for i, q in enumerate(perm))
                         for perm in itertools.permutations(range(4))])


def _rate_within(hits: torch.Tensor, p: float) -> None:
    n = hits.numel()
    rate = hits.float().mean().item()
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n), (rate, p)


def gray_batch(x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.stack([ref_gray(img) for img in x.double().numpy()])).float()


@pytest.mark.parametrize(
    "policy, p, transformed",
    [
        (only(flip_p=0.5), 0.5, lambda x: x.flip(-1)),
        (only(grayscale_p=0.2), 0.2, gray_batch),
        (only(solarize_p=0.2), 0.2, lambda x: torch.where(x < 0.5, x, 1 - x)),
        (only(blur_p=0.1, blur_kernel=3), 0.1, None),
        (only(jitter_p=0.8, brightness=0.4), 0.8, None),
    ],
    ids=["flip", "gray", "solarize", "blur", "jitter"],
)
def test_each_op_is_applied_with_its_probability(policy, p, transformed):
    n = 3000
    x = images(n, seed=9)  # colored, asymmetric, half the values above 0.5: every op shows
    out = ga.augment(x, policy, torch.Generator().manual_seed(10))
    same = (out == x).flatten(1).all(1)
    if transformed is not None:  # every image is either untouched or exactly the transformed one
        done = (out - transformed(x)).abs().flatten(1).amax(1) < ATOL
        assert torch.all(done ^ same)
    _rate_within(~same, p)


def test_jitter_order_varies_per_image():
    # brightness and contrast commute unless a clip intervenes: images with values near 0 and 1
    n = 400
    policy = only(jitter_p=1.0, brightness=0.4, contrast=0.4)
    x = images(n, seed=11)
    x = torch.where(x > 0.5, 0.9 + 0.1 * x, 0.1 * x)
    out = ga.augment(x, policy, torch.Generator().manual_seed(12))
    p = ga.draw_params(n, policy, torch.Generator().manual_seed(12), "cpu")
    seen = {True: 0, False: 0}
    for i in range(n):
        img, d, f = x[i].double().numpy(), float(p.brightness[i]), float(p.contrast[i])
        b_then_c = ref_contrast(ref_brightness(img, d), f)
        c_then_b = ref_brightness(ref_contrast(img, f), d)
        err_bc = np.abs(out[i].double().numpy() - b_then_c).max()
        err_cb = np.abs(out[i].double().numpy() - c_then_b).max()
        assert min(err_bc, err_cb) < ATOL
        if np.abs(b_then_c - c_then_b).max() > 1e-3:
            seen[bool(err_bc < err_cb)] += 1
    assert seen[True] > 20 and seen[False] > 20, seen


def test_same_seed_same_view_other_seed_other_view():
    x = images(32)
    for policy in (view1_policy(), view2_policy()):
        policy.crop_size, policy.blur_kernel = SIDE, 3
        a = ga.augment(x, policy, torch.Generator().manual_seed(13))
        b = ga.augment(x, policy, torch.Generator().manual_seed(13))
        c = ga.augment(x, policy, torch.Generator().manual_seed(14))
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)
        assert a.min() >= 0 and a.max() <= 1


# ---- make_view -------------------------------------------------------------------------------


def test_make_view_normalizes_flips_and_is_channels_last():
    u8 = (images(3) * 255).round().to(torch.uint8)
    for dtype in (torch.float32, torch.bfloat16):
        out = ga.make_view(u8, only(flip_p=1.0), torch.Generator().manual_seed(0),
                           IMAGENET_MEAN, IMAGENET_STD, dtype=dtype)
        assert out.shape == u8.shape and out.dtype == dtype
        assert out.is_contiguous(memory_format=torch.channels_last)
        # pixel (row 2, col 1) of image 1, channel 2, comes from column SIDE - 1 - 1 (flipped)
        want = (u8[1, 2, 2, SIDE - 2].item() / 255 - IMAGENET_MEAN[2]) / IMAGENET_STD[2]
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert abs(out[1, 2, 2, 1].item() - want) < tol


def test_make_view_uint8_float_and_memory_format_agree():
    u8 = (images(8, seed=15) * 255).round().to(torch.uint8)
    policy = view2_policy()
    policy.crop_size, policy.blur_kernel, policy.blur_p = SIDE, 3, 0.5
    views = [
        ga.make_view(src, policy, torch.Generator().manual_seed(16), IMAGENET_MEAN, IMAGENET_STD)
        for src in (u8, u8.float() / 255, u8.contiguous(memory_format=torch.channels_last))
    ]
    assert torch.equal(views[0], views[1]) and torch.equal(views[0], views[2])


def test_bad_inputs_name_what_was_expected():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="crop_size = 224"):
        ga.augment(torch.rand(2, 3, SIDE, SIDE), view1_policy(), g)
    with pytest.raises(ValueError, match=r"expected \(B, 3, H, W\)"):
        ga.augment(torch.rand(2, 1, SIDE, SIDE), only(), g)
    with pytest.raises(ValueError, match="expected uint8 or floating point"):
        ga.make_view(torch.zeros(2, 3, SIDE, SIDE, dtype=torch.int32), only(), g,
                     IMAGENET_MEAN, IMAGENET_STD)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_for_the_same_parameters():
    x = images(16)
    policy = ViewPolicy(crop_size=SIDE, blur_kernel=5, blur_p=0.5, solarize_p=0.5)
    p = ga.draw_params(16, policy, torch.Generator().manual_seed(17), "cpu")
    on_gpu = ga.ViewParams(*(t.cuda() for t in p))
    out = ga.apply_params(x.cuda(), on_gpu, policy).cpu()
    torch.testing.assert_close(out, ga.apply_params(x, p, policy), atol=1e-5, rtol=0)
    g = torch.Generator(device="cuda").manual_seed(0)
    view = ga.make_view(x.cuda(), policy, g, IMAGENET_MEAN, IMAGENET_STD, dtype=torch.bfloat16)
    assert view.is_cuda and view.is_contiguous(memory_format=torch.channels_last)
