"""The DALI backend on the CPU: layout, seeding, sharding, and each augmentation against its
definition (closed forms, colorsys, a torch convolution) and against pipelines.gpu_augment.

Known content survives exactly: images are PNGs (lossless) of side S = crop_size with the crop
pinned to the full image (scale 1, ratio 1), so a view is exactly the image unless an op acts.
"""

from __future__ import annotations

import colorsys
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import AugmentConfig, DataConfig, ViewPolicy, gpu_augment
from pipelines.policy import GRAY_WEIGHTS

pytestmark = pytest.mark.dali  # the whole module exercises DALI: skipped without it (conftest.py)
S = 16  # view side: tiny images keep every test fast
N = 256  # samples for statistics: a proportion's standard error is <= 0.031


def dali_module():
    import pipelines.dali as dali

    return dali


def augment_ops():
    import pipelines.dali_augment as ops

    return ops


# ---- fixtures --------------------------------------------------------------------------------

def gradient() -> np.ndarray:
    """(S, S, 3) uint8 rising left to right (asymmetric under a flip), channels distinct."""
    ramp = np.linspace(0, 255, S).round().astype(np.uint8)
    img = np.empty((S, S, 3), np.uint8)
    img[..., 0] = ramp
    img[..., 1] = ramp[::-1]
    img[..., 2] = 200
    return img


def write_list(tmp: Path, images: list[np.ndarray], repeat: int = 1) -> str:
    """PNGs for `images` and a `path label` list naming each `repeat` times (label = index)."""
    lines = []
    for i, img in enumerate(images):
        Image.fromarray(img).save(tmp / f"img{i}.png")
    for r in range(repeat):
        lines += [f"img{i}.png {i}" for i in range(len(images))]
    (tmp / "list.txt").write_text("\n".join(lines) + "\n")
    return str(tmp / "list.txt")


def only(**enabled) -> ViewPolicy:
    """A policy with every op off and the crop pinned to the whole image, except `enabled`."""
    base = ViewPolicy(
        crop_size=S, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0,
        brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, grayscale_p=0.0, blur_p=0.0,
        solarize_p=0.0,
    )
    return replace(base, **enabled)


def plain(policy: ViewPolicy, policy2: ViewPolicy | None = None) -> AugmentConfig:
    """Both views with `policy`, no normalization (mean 0, std 1): outputs are values in [0, 1]."""
    return AugmentConfig(policy, policy2 or policy, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def views(path: str, augment: AugmentConfig, batch: int = 64, seed: int = 0, **kw) -> torch.Tensor:
    """All view-1 outputs of epoch 0, as a numpy array (n, S, S, 3)."""
    dali = dali_module()
    data = DataConfig(backend="dali", path=path, batch_size=batch, num_workers=2, **kw)
    out = [b.view1 for b in dali.DALILoader(data, augment, "cpu", seed=seed).epoch(0)]
    return torch.cat(out).permute(0, 2, 3, 1).numpy()


def check_rate(hits: int, n: int, p: float) -> None:
    """hits/n within 4.5 standard errors of p (false alarm ~1e-5)."""
    se = math.sqrt(max(p * (1 - p), 1e-4) / n)
    assert abs(hits / n - p) <= 4.5 * se + 1e-9, (hits, n, p)


def run_op(build, *inputs: np.ndarray):
    """Outputs of a one-op DALI pipeline: build(*DataNodes) on float inputs given per sample."""
    dali = dali_module()
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=len(inputs[0]), num_threads=1, device_id=None, seed=1)
    def pipe():
        nodes = [fn.external_source(source=[list(a)], batch=True, cycle=False,
                                    layout="HWC" if a.ndim == 4 else None) for a in inputs]
        return build(*nodes)

    p = pipe()
    p.build()
    out = p.run()
    return [np.stack([np.array(t) for t in o]) for o in out]


@pytest.fixture(autouse=True)
def image_check_cache(tmp_path_factory, monkeypatch) -> Path:
    """The verified-list cache of pipelines.image_list in a fresh folder, not the user's home."""
    path = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("FASTBYOL_CACHE", str(path))
    return path


# ---- layout, seed, errors ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory) -> str:
    """An ImageFolder of 24 random 40x48 JPEGs in 2 classes."""
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for i in range(24):
        (root / f"c{i % 2}").mkdir(exist_ok=True)
        img = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / f"c{i % 2}" / f"{i}.jpg", quality=90)
    return str(root)


@pytest.mark.parametrize("decode", ["once", "roi"])
def test_two_views_of_the_asked_size_layout_and_dtype(jpeg_folder, decode):
    dali = dali_module()
    augment = AugmentConfig()
    augment.set_crop_size(32)
    data = DataConfig(backend="dali", path=jpeg_folder, batch_size=8, num_workers=2)
    data.dali.decode = decode
    ld = dali.DALILoader(data, augment, "cpu")
    batches = list(ld.epoch(0))
    assert len(batches) == len(ld) == 3
    for b in batches:
        for v in (b.view1, b.view2):
            assert v.shape == (8, 3, 32, 32) and v.dtype == torch.float32
            assert v.is_contiguous(memory_format=torch.channels_last)
        assert b.labels.dtype == torch.int64 and b.labels.shape == (8,)
        assert set(b.labels.tolist()) <= {0, 1}
        assert (b.view1 - b.view2).abs().mean() > 0.1  # independent augmentations


def test_fixed_seed_gives_a_fixed_first_batch(jpeg_folder):
    dali = dali_module()
    augment = AugmentConfig()
    augment.set_crop_size(32)
    data = DataConfig(backend="dali", path=jpeg_folder, batch_size=8, num_workers=2)
    first = [next(iter(dali.DALILoader(data, augment, "cpu", seed=s).epoch(0))) for s in (3, 3, 4)]
    for a, b in zip(first[0], first[1]):
        assert torch.equal(a, b)
    assert not torch.equal(first[0].view1, first[2].view1)


def test_missing_dali_says_what_to_install(monkeypatch):
    import pipelines.dali as dali

    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` fail
    with pytest.raises(ImportError, match="nvidia-dali-cuda130.*nvidia-dali-cuda120"):
        dali.import_dali()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_gpu_without_cuda_is_a_clear_error():
    import pipelines.dali as dali

    assert dali.resolve_device("auto", "cpu") == "cpu"
    with pytest.raises(RuntimeError, match="data.dali.device = gpu.*CUDA is not available"):
        dali.resolve_device("gpu", "cpu")


def test_bad_file_list_line_names_file_and_line(tmp_path):
    import pipelines.dali as dali

    (tmp_path / "l.txt").write_text("a.jpg 0\nb.jpg cat\n")
    with pytest.raises(ValueError, match=r"l.txt:2: 'b.jpg cat'"):
        dali.read_file_list(tmp_path / "l.txt")


# ---- sharding and resume ----------------------------------------------------------------------

@pytest.mark.parametrize("n,drop_last", [(40, True), (42, False)])
def test_two_shards_cover_every_file_once_per_epoch(tmp_path, n, drop_last):
    dali = dali_module()
    path = write_list(tmp_path, [np.full((S, S, 3), i, np.uint8) for i in range(n)])
    data = DataConfig(backend="dali", path=path, batch_size=8, num_workers=1, drop_last=drop_last)
    augment = plain(only())
    ranks = [dali.DALILoader(data, augment, "cpu", rank=r, world_size=2, seed=5) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == (n // 8 if drop_last else math.ceil(n / 8))
    steps = [[b.labels.tolist() for b in ld.epoch(1)] for ld in ranks]
    assert len(steps[0]) == len(steps[1]) == len(ranks[0])
    seen = sorted(i for rank in steps for step in rank for i in step)
    if drop_last:  # 5 full global batches: every image once
        assert seen == list(range(n))
    else:  # 6 steps; the last global batch of 2 would split 1 + 1, which BatchNorm cannot train on:
        # each rank's share is topped up to 2 with the epoch's first images
        assert sorted(set(seen)) == list(range(n)) and len(seen) == n + 2
        assert [len(step) for rank in steps for step in rank[-1:]] == [2, 2]
    # the label is the image index and the image is filled with it: labels travel with images
    first = next(iter(ranks[0].epoch(1)))
    assert torch.equal((first.view1[:, 0, 0, 0] * 255).round().long(), first.labels)


def test_one_rank_never_gets_a_last_batch_of_one_image(tmp_path):
    dali = dali_module()
    path = write_list(tmp_path, [np.full((S, S, 3), i, np.uint8) for i in range(17)])
    data = DataConfig(backend="dali", path=path, batch_size=8, num_workers=1, drop_last=False)
    steps = [b.labels.tolist() for b in dali.DALILoader(data, plain(only()), "cpu", seed=5).epoch(0)]
    assert [len(s) for s in steps] == [8, 8, 2]  # 16 + 1: the last image and the epoch's first
    assert steps[-1][1] == steps[0][0] and sorted({i for s in steps for i in s}) == list(range(17))


def test_resume_mid_epoch_sees_the_same_images(tmp_path):
    dali = dali_module()
    path = write_list(tmp_path, [np.full((S, S, 3), i, np.uint8) for i in range(40)])
    data = DataConfig(backend="dali", path=path, batch_size=8, num_workers=1)
    ld = dali.DALILoader(data, AugmentConfig(only(), only()), "cpu", seed=1)
    full = [b.labels.tolist() for b in ld.epoch(3)]
    assert [b.labels.tolist() for b in ld.epoch(3, start_step=3)] == full[3:]
    assert list(ld.epoch(3, start_step=len(ld))) == []
    assert [b.labels.tolist() for b in ld.epoch(4)] != full  # a new order every epoch


# ---- each augmentation against its definition -------------------------------------------------

def test_all_ops_off_is_the_image_normalized(tmp_path):
    img = gradient()
    path = write_list(tmp_path, [img], repeat=8)
    augment = AugmentConfig(only(), only(), mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    out = views(path, augment, batch=8)
    expect = (img / 255.0 - np.array(augment.mean)) / np.array(augment.std)
    np.testing.assert_allclose(out, np.broadcast_to(expect, out.shape), atol=1e-5)


def test_flip_probability_from_an_asymmetric_image(tmp_path):
    img = gradient()
    out = views(write_list(tmp_path, [img], repeat=N), plain(only(flip_p=0.3)))
    ref, flipped = img / 255.0, img[:, ::-1] / 255.0
    is_ref = np.abs(out - ref).max(axis=(1, 2, 3)) < 1e-6
    is_flip = np.abs(out - flipped).max(axis=(1, 2, 3)) < 1e-6
    assert np.all(is_ref ^ is_flip)
    check_rate(is_flip.sum(), N, 0.3)


@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_solarize_probability_and_threshold_from_a_gradient(tmp_path, threshold):
    img = gradient()
    out = views(write_list(tmp_path, [img], repeat=N),
                plain(only(solarize_p=0.2, solarize_threshold=threshold)))
    x = img / 255.0
    solar = np.where(x < threshold, x, 1.0 - x)
    is_ref = np.abs(out - x).max(axis=(1, 2, 3)) < 1e-6
    is_solar = np.abs(out - solar).max(axis=(1, 2, 3)) < 1e-6
    assert np.all(is_ref ^ is_solar)
    check_rate(is_solar.sum(), N, 0.2)


def test_grayscale_probability_from_channel_equality(tmp_path):
    img = gradient()
    out = views(write_list(tmp_path, [img], repeat=N), plain(only(grayscale_p=0.4)))
    gray = np.ptp(out, axis=3).max(axis=(1, 2)) < 1e-6
    luma = (img / 255.0) @ np.array(GRAY_WEIGHTS)
    np.testing.assert_allclose(out[gray][..., 0], np.broadcast_to(luma, (gray.sum(), S, S)),
                               atol=1e-5)
    assert np.all(np.abs(out[~gray] - img / 255.0).max(axis=(1, 2, 3)) < 1e-6)
    check_rate(gray.sum(), N, 0.4)


def test_blur_probability_from_variance_reduction(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (S, S, 3), dtype=np.uint8)
    policy = only(blur_p=0.3, blur_sigma=(1.0, 2.0), blur_kernel=7)
    out = views(write_list(tmp_path, [noise], repeat=N), plain(policy))
    x = noise / 255.0
    # interior pixels (no padding effect): noise variance drops by sum(w²)² ≈ 1/(4πσ²)² << 0.5
    inner = (slice(3, -3), slice(3, -3))
    ratio = out[:, inner[0], inner[1]].var(axis=(1, 2, 3)) / x[inner].var()
    blurred = ratio < 0.5
    assert np.all(np.abs(out[~blurred] - x).max(axis=(1, 2, 3)) < 1e-6)
    check_rate(blurred.sum(), N, 0.3)


def test_brightness_delta_is_uniform_in_the_policy_range(tmp_path):
    gray = np.full((S, S, 3), 128, np.uint8)
    out = views(write_list(tmp_path, [gray], repeat=N), plain(only(jitter_p=0.5, brightness=0.3)))
    delta = out[:, 0, 0, 0] - 128 / 255.0
    assert np.all(np.ptp(out, axis=(1, 2, 3)) < 1e-6)  # additive: the image stays uniform
    moved = np.abs(delta) > 1e-6
    check_rate(moved.sum(), N, 0.5)
    d = np.sort(delta[moved])
    assert d.min() >= -0.3 - 1e-6 and d.max() <= 0.3 + 1e-6
    # Kolmogorov-Smirnov distance to U[-0.3, 0.3]; 1.95/sqrt(n) is the 0.1% critical value
    cdf = (d + 0.3) / 0.6
    k = np.arange(1, len(d) + 1) / len(d)
    assert max(np.abs(cdf - k).max(), np.abs(cdf - (k - 1 / len(d))).max()) < 1.95 / math.sqrt(len(d))


def hsv_reference(x: np.ndarray, sat: float, hue: float) -> np.ndarray:
    """colorsys: s·sat clipped to 1 and h + hue mod 1, per pixel (the official semantics)."""
    out = np.empty_like(x)
    for idx in np.ndindex(x.shape[:-1]):
        h, s, v = colorsys.rgb_to_hsv(*x[idx])
        out[idx] = colorsys.hsv_to_rgb((h + hue) % 1.0, min(s * sat, 1.0), v)
    return out


def test_saturation_and_hue_are_exact_hsv():
    ops = augment_ops()
    rng = np.random.default_rng(1)
    x = rng.random((4, 6, 6, 3), dtype=np.float32)
    x[0, 0, 0] = (0.3, 0.3, 0.3)  # gray pixel
    x[0, 0, 1] = (0.0, 0.0, 0.0)
    x[1, 0, 0] = (0.9, 0.9, 0.2)  # ties of the max
    x[1, 0, 1] = (0.9, 0.2, 0.9)
    factors = np.array([0.8, 1.2, 3.0, 1.0], np.float32)
    deltas = np.array([0.1, -0.1, 0.45, -0.37], np.float32)
    sat, hue = run_op(lambda a, f, d: (ops.saturation(a, f), ops.hue(a, d)), x, factors, deltas)
    for i in range(4):
        np.testing.assert_allclose(sat[i], hsv_reference(x[i], factors[i], 0.0), atol=2e-6)
        np.testing.assert_allclose(hue[i], hsv_reference(x[i], 1.0, deltas[i]), atol=2e-6)


def test_brightness_contrast_gray_solarize_match_their_formulas():
    ops = augment_ops()
    x = np.random.default_rng(2).random((3, 5, 7, 3), dtype=np.float32)
    f = np.array([0.6, 1.4, 1.0], np.float32)
    d = np.array([-0.4, 0.25, 0.0], np.float32)
    b, c, g, s = run_op(lambda a, f, d: (ops.brightness(a, d), ops.contrast(a, f),
                                         ops.grayscale(a), ops.solarize(a, 0.4)), x, f, d)
    mean = x.mean(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(b, np.clip(x + d[:, None, None, None], 0, 1), atol=1e-6)
    np.testing.assert_allclose(
        c, np.clip(f[:, None, None, None] * (x - mean) + mean, 0, 1), atol=1e-6)
    np.testing.assert_allclose(g, np.repeat(x @ np.array(GRAY_WEIGHTS, np.float32), 3)
                               .reshape(x.shape), atol=1e-6)
    np.testing.assert_allclose(s, np.where(x < 0.4, x, 1 - x), atol=1e-7)


def test_blur_is_a_zero_padded_separable_gaussian():
    ops = augment_ops()
    x = np.random.default_rng(3).random((2, 12, 10, 3), dtype=np.float32)
    sigma = np.array([0.7, 2.0], np.float32)
    (out,) = run_op(lambda a, s: (ops.blur(a, s, 9),), x, sigma)
    t = torch.arange(-4, 5, dtype=torch.float64)
    for i in range(2):
        w = torch.exp(-t**2 / (2 * float(sigma[i]) ** 2))
        w = w / w.sum()
        img = torch.from_numpy(x[i]).double().permute(2, 0, 1)[:, None]  # (3, 1, H, W)
        ref = torch.nn.functional.conv2d(img, w.view(1, 1, 9, 1), padding=(4, 0))
        ref = torch.nn.functional.conv2d(ref, w.view(1, 1, 1, 9), padding=(0, 4))
        np.testing.assert_allclose(out[i], ref[:, 0].permute(1, 2, 0).numpy(), atol=1e-6)


# ---- one policy, two backends -----------------------------------------------------------------

def two_sample_ks(a: np.ndarray, b: np.ndarray) -> float:
    grid = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


def test_dali_and_gpu_augment_agree_on_the_same_images(tmp_path):
    """The full T' policy (crop pinned) on one image through both backends: the distributions
    of per-view statistics agree (two-sample KS at the 0.1% level) and the rates match."""
    rng = np.random.default_rng(4)
    img = np.clip(gradient() + rng.integers(-40, 40, (S, S, 3)), 0, 255).astype(np.uint8)
    policy = replace(AugmentConfig().view2, crop_size=S, crop_scale=(1.0, 1.0),
                     crop_ratio=(1.0, 1.0), blur_kernel=5, blur_p=0.3, solarize_p=0.3)
    n = 512
    out_dali = views(write_list(tmp_path, [img], repeat=n), plain(policy), batch=128)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].expand(n, 3, S, S).contiguous()
    g = torch.Generator().manual_seed(0)
    out_torch = gpu_augment.make_view(x, policy, g, (0.0,) * 3, (1.0,) * 3)
    out_torch = out_torch.permute(0, 2, 3, 1).numpy()

    def stats(v):
        lum = v @ np.array(GRAY_WEIGHTS)
        return {
            "mean": v.mean(axis=(1, 2, 3)),
            "std": v.std(axis=(1, 2, 3)),
            "red-blue": (v[..., 0] - v[..., 2]).mean(axis=(1, 2)),  # hue and saturation
            "left-right": (lum[:, :, :S // 2] - lum[:, :, S // 2:]).mean(axis=(1, 2)),  # flip
        }

    crit = 1.95 * math.sqrt(2 / n)
    for key, (a, b) in {k: (stats(out_dali)[k], stats(out_torch)[k]) for k in stats(out_dali)}.items():
        assert two_sample_ks(a, b) < crit, key
    gray = [np.mean(np.ptp(v, axis=3).max(axis=(1, 2)) < 1e-6) for v in (out_dali, out_torch)]
    assert abs(gray[0] - gray[1]) < 4.5 * math.sqrt(2 * 0.2 * 0.8 / n)


def test_jitter_order_is_random_per_image_as_in_gpu_augment(tmp_path):
    """On a black | gray | white image, contrast then brightness keeps the ratio of the two
    level gaps whenever nothing clips, while brightness then contrast always clips black or
    white first and changes it. The share of images keeping the ratio (about 0.2 for a random
    order, 0 or about 0.4 for a fixed one) must match the torch path's."""
    img = np.zeros((S, S, 3), np.uint8)
    img[:, 5:11], img[:, 11:] = 128, 255
    policy = only(jitter_p=1.0, brightness=0.05, contrast=0.4)
    n = 512
    out_dali = views(write_list(tmp_path, [img], repeat=n), plain(policy), batch=128)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].expand(n, 3, S, S).contiguous()
    out_torch = gpu_augment.make_view(x, policy, torch.Generator().manual_seed(0), (0.0,) * 3,
                                      (1.0,) * 3).permute(0, 2, 3, 1).numpy()
    x0 = 128 / 255

    def keeps_ratio(v: np.ndarray) -> np.ndarray:
        lo, mid, hi = v[:, 0, 0, 0], v[:, 0, 7, 0], v[:, 0, -1, 0]
        return np.abs((mid - lo) * (1 - x0) - (hi - mid) * x0) < 1e-4

    rates = [keeps_ratio(v).mean() for v in (out_dali, out_torch)]
    pooled = (rates[0] + rates[1]) / 2
    assert 0.1 < pooled < 0.3
    assert abs(rates[0] - rates[1]) < 4.5 * math.sqrt(2 * pooled * (1 - pooled) / n)


# ---- bad images, per-sample draws, exact resume (issue 15, section 3) --------------------------

def truncated_copy(folder: Path, name: str) -> Path:
    """A copy of the folder's first JPEG cut to half its bytes, as `name` in its class c0."""
    src = sorted((folder / "c0").glob("*.jpg"))[0]
    bad = folder / "c0" / name
    bad.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return bad


def test_a_truncated_jpeg_is_skipped_by_path_or_named(tmp_path, jpeg_folder):
    # DALI itself stops the run at step 2 with "nvImageCodec failure", naming no file
    import shutil

    from pipelines.image_list import BadImageWarning
    from pipelines.images import BadImageError

    dali = dali_module()
    folder = Path(shutil.copytree(jpeg_folder, tmp_path / "tree"))
    bad = truncated_copy(folder, "0000_truncated.jpg")  # sorts first: in the first batches
    augment = AugmentConfig()
    augment.set_crop_size(16)
    data = DataConfig(backend="dali", path=str(folder), batch_size=8, num_workers=1)
    with pytest.warns(BadImageWarning, match=str(bad)):
        ld = dali.DALILoader(data, augment, "cpu")
    assert len(ld.paths) == 24 and str(bad) not in ld.paths and ld.images.skipped[0][0] == str(bad)
    assert sum(b.labels.numel() for b in ld.epoch(0)) == 24  # every batch decodes
    data.on_bad_image = "error"
    with pytest.raises(BadImageError, match=f"{bad}: cannot decode image"):
        dali.DALILoader(data, augment, "cpu")


def test_the_image_check_is_cached_by_size_and_mtime(tmp_path, jpeg_folder, monkeypatch):
    import os
    import shutil

    import pipelines.image_list as image_list

    folder = Path(shutil.copytree(jpeg_folder, tmp_path / "tree"))
    paths = sorted(str(p) for p in folder.rglob("*.jpg"))
    checked = []
    real = image_list.inspect_image
    monkeypatch.setattr(image_list, "inspect_image", lambda p: checked.append(p) or real(p))
    first = image_list.verify_images(paths, list(range(24)), name=str(folder))
    assert len(checked) == 24 and first.heights == [40] * 24 and first.widths == [48] * 24
    checked.clear()
    assert image_list.verify_images(paths, list(range(24)), name=str(folder)) == first
    assert checked == []  # nothing decoded again
    st = os.stat(paths[3])
    os.utime(paths[3], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # "changed": checked again
    image_list.verify_images(paths, list(range(24)), name=str(folder))
    assert checked == [paths[3]]


def test_views_are_functions_of_seed_epoch_and_image_not_of_rank_or_step(jpeg_folder):
    # the same image gets the same two views whether one rank loads it or another does
    dali = dali_module()
    augment = AugmentConfig()
    augment.set_crop_size(16)
    data = DataConfig(backend="dali", path=jpeg_folder, batch_size=8, num_workers=1)
    one = next(iter(dali.DALILoader(data, augment, "cpu", seed=7).epoch(2)))
    halves = [next(iter(dali.DALILoader(data, augment, "cpu", rank=r, world_size=2, seed=7).epoch(2)))
              for r in range(2)]
    for k in range(3):
        assert torch.equal(torch.cat([h[k] for h in halves]), one[k])


@pytest.mark.parametrize("decode", ["once", "roi"])
def test_resume_mid_epoch_is_exact(jpeg_folder, decode):
    dali = dali_module()
    augment = AugmentConfig()  # every op of the BYOL policy on
    augment.set_crop_size(16)
    data = DataConfig(backend="dali", path=jpeg_folder, batch_size=8, num_workers=1)
    data.dali.decode = decode
    ld = dali.DALILoader(data, augment, "cpu", seed=3)
    full = list(ld.epoch(5))
    resumed = list(ld.epoch(5, start_step=1))
    assert len(resumed) == len(full) - 1
    for a, b in zip(full[1:], resumed):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    assert not torch.equal(full[0].view1, next(iter(ld.epoch(6))).view1)  # new draws every epoch


def test_a_dali_run_resumed_after_an_interruption_is_bit_identical(tmp_path, jpeg_folder, one_thread):
    import os
    import signal

    from fastbyol import checkpoint
    from fastbyol.config import load_config
    from fastbyol.train import Interrupted, train

    dali_module()
    common = ["model.depth=18", "model.stem=cifar", "byol.hidden_dim=64", "byol.proj_dim=32",
              "augment.view1.crop_size=16", "augment.view2.crop_size=16", "train.precision=fp32", "train.device=cpu",
              "logging.progress=none", "logging.plot=false", "data.backend=dali", f"data.path={jpeg_folder}",
              "data.batch_size=8", "data.num_workers=1", "train.epochs=2", "optim.lr=0.3", "train.checkpoint_every=100"]
    train(load_config(None, [*common, f"train.run_dir={tmp_path / 'straight'}"]))

    def interrupt_at_4(step: int) -> None:  # mid-epoch: 3 steps per epoch
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    cfg = [*common, f"train.run_dir={tmp_path / 'resumed'}"]
    with pytest.raises(Interrupted):
        train(load_config(None, cfg), step_hook=interrupt_at_4)
    assert train(load_config(None, cfg))["steps"] == 6
    straight = checkpoint.load_latest(tmp_path / "straight")["model"]
    resumed = checkpoint.load_latest(tmp_path / "resumed")["model"]
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_draws_in_worker_processes_give_the_same_views(jpeg_folder):
    # on GPUs RunSource runs in DALI's spawned workers (parallel external source)
    dali = dali_module()
    augment = AugmentConfig()
    augment.set_crop_size(16)
    data = DataConfig(backend="dali", path=jpeg_folder, batch_size=8, num_workers=2)
    serial, parallel = dali.DALILoader(data, augment, "cpu", seed=2), dali.DALILoader(data, augment, "cpu", seed=2)
    assert not serial.parallel_source  # CPU operators: the draws stay in this process
    parallel.parallel_source = True
    serial, workers = list(serial.epoch(1, start_step=1)), list(parallel.epoch(1, start_step=1))
    assert len(serial) == len(workers) == 2
    for a, b in zip(serial, workers):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


# ---- one pipeline per run (issue 18) ----------------------------------------------------------

def test_one_pipeline_serves_consecutive_epochs_as_fresh_pipelines_would(jpeg_folder, monkeypatch):
    """Epochs taken one after the other (a resumed start, then whole epochs) come from one
    pipeline, DALI's epoch_idx standing for the epoch: the same tensors as a loader built for
    each epoch alone. An epoch left early, or asked out of turn, gets a new pipeline."""
    dali = dali_module()
    augment = AugmentConfig()
    augment.set_crop_size(16)
    data = DataConfig(backend="dali", path=jpeg_folder, batch_size=8, num_workers=1)
    builds = []
    real = dali.DALILoader.pipeline
    monkeypatch.setattr(dali.DALILoader, "pipeline", lambda self, *a: builds.append(a) or real(self, *a))
    run = dali.DALILoader(data, augment, "cpu", seed=4)
    got = [list(run.epoch(2, start_step=1)), list(run.epoch(3)), list(run.epoch(4))]
    assert builds == [(2, 1)]
    want = [list(dali.DALILoader(data, augment, "cpu", seed=4).epoch(e, s)) for e, s in ((2, 1), (3, 0), (4, 0))]
    for got_epoch, want_epoch in zip(got, want):
        assert len(got_epoch) == len(want_epoch) > 0
        for a, b in zip(got_epoch, want_epoch):
            for x, y in zip(a, b):
                assert torch.equal(x, y)
    builds.clear()
    first = next(iter(run.epoch(5)))  # the next epoch, from the same pipeline, left after one step
    again = list(run.epoch(5))  # the pipeline is mid-epoch: a new one
    assert builds == [(5, 0)]
    fresh = list(dali.DALILoader(data, augment, "cpu", seed=4).epoch(5))
    for a, b in zip([first, *again], [fresh[0], *fresh]):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_the_source_hands_dali_one_array_per_draw_per_batch(jpeg_folder):
    """RunSource's outputs for a step: a list of the batch's encoded files, then one array per
    label and per draw with the batch as its leading dimension, rows equal to the per-image
    definition: the crop box of pipelines.crops.sample_crop and 11 uniforms of the same stream
    numpy_rng(seed, epoch, image, view) mapped to the coins and factors."""
    dali = dali_module()
    from nvidia.dali.types import BatchInfo

    from pipelines.crops import sample_crop
    from pipelines.seeding import numpy_rng

    augment = AugmentConfig()
    augment.set_crop_size(16)
    data = DataConfig(backend="dali", path=jpeg_folder, batch_size=8, num_workers=1)
    ld = dali.DALILoader(data, augment, "cpu", seed=6)
    source = dali.RunSource(ld, first_epoch=3, first_step=1)
    out = source(BatchInfo(1, 1))  # DALI's second epoch, its second step: epoch 4, step 1
    indices = ld.plan.batch_indices(4)[1]
    assert len(out) == source.num_outputs and len(out[0]) == 8
    assert all(isinstance(a, np.ndarray) and a.shape[0] == 8 for a in out[1:])
    assert out[1].ravel().tolist() == [ld.labels[i] for i in indices]
    col = 2
    for view, policy in ((1, augment.view1), (2, augment.view2)):
        drawn = dict(zip(source.names[view - 1], out[col:col + len(source.names[view - 1])]))
        col += len(source.names[view - 1])
        for row, i in enumerate(indices):
            rng = numpy_rng(6, 4, int(i), view)
            top, left, h, w = sample_crop(rng, ld.images.heights[i], ld.images.widths[i], policy.crop_scale,
                                          policy.crop_ratio)
            u = rng.random(11)
            want = {"anchor": [top, left], "shape": [h, w], "flip": u[0] < policy.flip_p,
                    "jitter": u[1] < policy.jitter_p, "brightness": policy.brightness * (2 * u[2] - 1),
                    "contrast": 1 + policy.contrast * (2 * u[3] - 1),
                    "saturation": 1 + policy.saturation * (2 * u[4] - 1), "hue": policy.hue * (2 * u[5] - 1),
                    "perm": min(int(u[6] * 24), 23), "gray": u[7] < policy.grayscale_p,
                    "blur": u[8] < policy.blur_p,
                    "sigma": policy.blur_sigma[0] + (policy.blur_sigma[1] - policy.blur_sigma[0]) * u[9],
                    "solarize": u[10] < policy.solarize_p}
            for name, value in drawn.items():
                np.testing.assert_allclose(value[row], want[name], rtol=1e-6, err_msg=name)
    with pytest.raises(StopIteration):
        source(BatchInfo(len(ld), 1))


def test_worker_processes_serve_consecutive_epochs_from_one_pipeline(jpeg_folder, monkeypatch):
    # DALI's spawned workers get the source once per run and the epoch from batch_info
    dali = dali_module()
    augment = AugmentConfig()
    augment.set_crop_size(16)
    data = DataConfig(backend="dali", path=jpeg_folder, batch_size=8, num_workers=2)
    serial, parallel = dali.DALILoader(data, augment, "cpu", seed=2), dali.DALILoader(data, augment, "cpu", seed=2)
    parallel.parallel_source = True
    builds = []
    real = dali.DALILoader.pipeline
    monkeypatch.setattr(dali.DALILoader, "pipeline", lambda self, *a: builds.append(a) or real(self, *a))
    for epoch, start in ((1, 1), (2, 0), (3, 0)):
        a, b = list(serial.epoch(epoch, start)), list(parallel.epoch(epoch, start))
        assert len(a) == len(b) == 3 - start
        for x, y in zip(a, b):
            for s, t in zip(x, y):
                assert torch.equal(s, t)
    assert builds == [(1, 1), (1, 1)]  # one per loader
