"""The folder backend: ImageFolder discovery, crops, derived seeding, sharding, bad images."""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import DataConfig, build_loader
from pipelines import folder as folder_mod
from pipelines.crops import sample_crop
from pipelines.images import BadImageError, BadImageWarning, decode_rgb
from pipelines.policy import AugmentConfig
from pipelines.seeding import numpy_rng
from pipelines.sources import find_images

CROP = 16
N_IMAGES = 15  # in tiny_image_folder


def _noise(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny_image_folder(tmp_path_factory) -> Path:
    """3 classes (created out of order), 4 images each in assorted formats, modes and sizes,
    one nested, plus files the reader must ignore."""
    root = tmp_path_factory.mktemp("tiny_image_folder")
    rng = np.random.default_rng(0)
    for name in ("cat", "ant", "bee"):
        (root / name / "nested").mkdir(parents=True)
        _noise(rng, 24, 32).save(root / name / "a.jpg")
        _noise(rng, 30, 20).save(root / name / "b.JPG")  # upper-case extension counts
        _noise(rng, 20, 20).convert("P").save(root / name / "c.png")  # palette
        _noise(rng, 28, 28).save(root / name / "nested" / "d.webp")
        (root / name / "notes.txt").write_text("not an image")
        _noise(rng, 8, 8).save(root / name / ".hidden.jpg")
    _noise(rng, 26, 22).convert("L").save(root / "ant" / "e.jpeg")  # grayscale
    _noise(rng, 22, 26).convert("CMYK").save(root / "bee" / "f.jpg")  # CMYK JPEG
    _noise(rng, 20, 24).save(root / "cat" / "g.bmp")
    return root


def _augment(size: int = CROP) -> AugmentConfig:
    augment = AugmentConfig()
    augment.set_crop_size(size)
    return augment


def _loader(root, batch_size=4, num_workers=0, rank=0, world_size=1, seed=0, **kw):
    data = DataConfig(backend="folder", path=str(root), batch_size=batch_size,
                      num_workers=num_workers, **kw)
    return build_loader(data, _augment(), torch.device("cpu"), rank=rank,
                        world_size=world_size, seed=seed)


# ---------------------------------------------------------------- discovery


def test_find_images_labels_follow_sorted_folder_names(tiny_image_folder):
    paths, labels, classes = find_images(tiny_image_folder)
    assert classes == ["ant", "bee", "cat"]
    assert len(paths) == 3 * 4 + 3 == N_IMAGES == len(labels)
    for path, label in zip(paths, labels):
        class_name = Path(path).relative_to(tiny_image_folder).parts[0]
        assert classes[label] == class_name
        assert not Path(path).name.startswith(".") and not path.endswith(".txt")
    assert sum(p.endswith("d.webp") for p in paths) == 3  # recursion into a class folder


def test_find_images_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        find_images(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=re.escape(str(empty)) + ".*no class folders"):
        find_images(empty)
    (empty / "class_a").mkdir()
    (empty / "class_a" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=re.escape(str(empty)) + ".*no images"):
        find_images(empty)
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        _loader(missing)


def test_decode_rgb_converts_every_mode(tiny_image_folder):
    gray = decode_rgb(str(tiny_image_folder / "ant" / "e.jpeg"))
    assert gray.mode == "RGB"
    px = np.asarray(gray)
    assert (px[..., 0] == px[..., 1]).all() and (px[..., 1] == px[..., 2]).all()
    for name in ("bee/f.jpg", "cat/c.png", "cat/g.bmp", "ant/nested/d.webp"):
        assert decode_rgb(str(tiny_image_folder / name)).mode == "RGB"


# ---------------------------------------------------------------- crops


def test_torchvision_sample_crop_area_and_ratio_within_bounds():
    height, width, scale, ratio = 800, 1000, (0.08, 1.0), (3 / 4, 4 / 3)
    rng = np.random.default_rng(0)
    boxes = np.array([sample_crop(rng, height, width, scale, ratio, "torchvision") for _ in range(3000)])
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    area = h * w / (height * width)
    aspect = w / h
    # Rounding w and h to pixels moves area and ratio by well under 1% on a 1000 x 800 image
    assert area.min() >= scale[0] * 0.99 and area.max() <= scale[1]
    assert aspect.min() >= ratio[0] * 0.99 and aspect.max() <= ratio[1] * 1.01
    # ... and the draws span the ranges (not a degenerate sampler)
    assert area.min() < 0.1 and area.max() > 0.9
    assert aspect.min() < 0.77 and aspect.max() > 1.3
    # log-uniform ratio: symmetric around 1 in log space (up to the rejection of wide boxes)
    assert abs(np.median(np.log(aspect))) < 0.05


@pytest.mark.parametrize("height,width,expected", [
    # No box of area >= 8% with ratio in [3/4, 4/3] fits: the centered fallback, ratio clamped
    (10, 1000, (0, (1000 - 13) // 2, 10, 13)),  # too wide: h = 10, w = round(10 * 4/3)
    (1000, 10, ((1000 - 13) // 2, 0, 13, 10)),  # too tall: w = 10, h = round(10 / (3/4))
])
def test_sample_crop_fallback_on_extreme_aspect(height, width, expected):
    for seed in range(5):
        assert sample_crop(np.random.default_rng(seed), height, width, (0.08, 1.0),
                           (3 / 4, 4 / 3), "torchvision") == expected


def test_sample_crop_fallback_keeps_whole_image_when_ratio_fits():
    # scale > 1 can never be satisfied, so every try fails; the image's ratio (1.25) is allowed
    box = sample_crop(np.random.default_rng(0), 40, 50, (1.5, 2.0), (3 / 4, 4 / 3), "torchvision")
    assert box == (0, 0, 40, 50)


def official_box(height, width, area_u, log_ratio_u, top_u, left_u, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """deepmind-research byol/utils/dataset.py _decode_and_random_crop, transcribed: one draw,
    w = min(round(sqrt(A * r)), width), h = min(round(sqrt(A / r)), height), uniform offsets."""
    target_area = height * width * (scale[0] + (scale[1] - scale[0]) * area_u)
    r = np.exp(np.log(ratio[0]) + (np.log(ratio[1]) - np.log(ratio[0])) * log_ratio_u)
    w = min(int(np.round(np.sqrt(target_area * r))), width)
    h = min(int(np.round(np.sqrt(target_area / r))), height)
    return int(top_u * (height - h + 1)), int(left_u * (width - w + 1)), h, w


class _OneDrawRng:
    """Feeds sample_crop the uniforms (area, ratio) and the integer draws (top, left) given."""

    def __init__(self, u):
        self.u, self.i = list(u), 0

    def uniform(self, lo, hi):
        self.i += 1
        return lo + (hi - lo) * self.u[self.i - 1]

    def integers(self, lo, hi):
        self.i += 1
        return lo + int(self.u[self.i - 1] * (hi - lo))


def test_official_sample_crop_is_the_official_definition():
    rng = np.random.default_rng(0)
    clamped = 0
    for _ in range(2000):
        height, width = (int(x) for x in rng.integers(20, 400, 2))
        u = rng.random(4)
        box = sample_crop(_OneDrawRng(u), height, width, (0.08, 1.0), (3 / 4, 4 / 3), "official")
        assert box == official_box(height, width, *u)
        clamped += box[3] == width or box[2] == height
    assert clamped > 50  # the clamp, not a retry, handles boxes that do not fit


def test_official_sample_crop_distribution_and_clamp():
    rng = np.random.default_rng(1)
    # a square image where every box of area <= 0.5 fits: area ~ U[0.08, 0.5], log ratio uniform
    boxes = np.array([sample_crop(rng, 1000, 1000, (0.08, 0.5), (3 / 4, 4 / 3)) for _ in range(4000)])
    top, left, h, w = boxes.T
    area, log_ratio = h * w / 1e6, np.log(w / h)
    assert abs(area.mean() - 0.29) < 0.01 and abs(area.var() - 0.42**2 / 12) < 0.001
    assert abs(log_ratio.mean()) < 0.01 and abs(log_ratio.var() - np.log(16 / 9) ** 2 / 12) < 0.002
    assert (top + h <= 1000).all() and (left + w <= 1000).all()
    # whole-image area at ratio 4/3 on a 3:4 portrait: one draw, clamped to the full width
    boxes = {sample_crop(rng, 400, 300, (1.0, 1.0), (4 / 3, 4 / 3)) for _ in range(200)}
    h_expected = round(np.sqrt(400 * 300 / (4 / 3)))  # 300 rows: fits the height
    assert {(h, w) for _, _, h, w in boxes} == {(h_expected, 300)}
    assert len({top for top, *_ in boxes}) > 50  # placed at random, not centred


def test_dataset_views_are_bicubic_crops_drawn_from_derived_rng(tiny_image_folder):
    loader = _loader(tiny_image_folder)
    dataset = loader.dataset
    epoch, index = 3, 5
    view1, view2, label = dataset[(epoch, index)]
    assert label == dataset.labels[index]
    image = Image.open(dataset.paths[index]).convert("RGB")
    for k, view in ((1, view1), (2, view2)):
        top, left, h, w = sample_crop(numpy_rng(0, epoch, index, k), image.height, image.width,
                                      (0.08, 1.0), (3 / 4, 4 / 3))
        expected = image.crop((left, top, left + w, top + h))
        expected = expected.resize((CROP, CROP), Image.BICUBIC)
        assert view.dtype == torch.uint8 and view.shape == (3, CROP, CROP)
        diff = view.permute(1, 2, 0).int() - torch.from_numpy(np.array(expected)).int()
        assert diff.abs().max() == 0


# ---------------------------------------------------------------- batches


def test_batches_shape_dtype_layout_and_labels(tiny_image_folder):
    loader = _loader(tiny_image_folder, batch_size=4)
    assert loader.batch_size == 4 and len(loader) == N_IMAGES // 4
    batches = list(loader.epoch(0))
    assert len(batches) == len(loader)
    expected_labels = [[loader.dataset.labels[i] for i in b] for b in loader.plan.batch_indices(0)]
    for batch, labels in zip(batches, expected_labels):
        for view in (batch.view1, batch.view2):
            assert view.shape == (4, 3, CROP, CROP)
            assert view.dtype == torch.float32 and view.device.type == "cpu"
            assert view.is_contiguous(memory_format=torch.channels_last)
            assert torch.isfinite(view).all()
        assert not torch.allclose(batch.view1, batch.view2)  # independent crops and augmentation
        assert batch.labels.dtype == torch.int64 and batch.labels.tolist() == labels


def test_worker_count_does_not_change_batches(tiny_image_folder):
    first = [next(iter(_loader(tiny_image_folder, num_workers=w).epoch(1))) for w in (0, 2)]
    for a, b in zip(first[0], first[1]):
        assert torch.equal(a, b)
    other_epoch = next(iter(_loader(tiny_image_folder).epoch(2)))
    assert not torch.equal(first[0].view1, other_epoch.view1)


def test_start_step_yields_the_rest_of_the_epoch_without_decoding_skipped(tiny_image_folder,
                                                                           monkeypatch):
    loader = _loader(tiny_image_folder, batch_size=2)
    full = list(loader.epoch(4))
    calls = []
    decode = folder_mod.decode_rgb
    monkeypatch.setattr(folder_mod, "decode_rgb", lambda p: calls.append(p) or decode(p))
    start = 4
    resumed = list(loader.epoch(4, start_step=start))
    assert len(resumed) == len(full) - start
    assert len(calls) == 2 * len(resumed)  # the skipped steps' images were never opened
    for a, b in zip(full[start:], resumed):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    assert list(loader.epoch(4, start_step=len(loader))) == []
    with pytest.raises(ValueError, match="start_step"):
        loader.epoch(4, start_step=len(loader) + 1)


def test_two_ranks_split_each_global_batch(tiny_image_folder):
    ranks = [_loader(tiny_image_folder, batch_size=4, rank=r, world_size=2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == N_IMAGES // 4
    assert ranks[0].batch_size == ranks[1].batch_size == 2
    order = numpy_rng(0, 7).permutation(N_IMAGES)  # the epoch's permutation, computed independently
    per_rank = [[b.tolist() for b in r.plan.batch_indices(7)] for r in ranks]
    for step, (b0, b1) in enumerate(zip(*per_rank)):
        assert len(b0) == len(b1) == 2
        assert not set(b0) & set(b1)
        assert sorted(b0 + b1) == sorted(order[4 * step:4 * step + 4])
    batch0, batch1 = (next(iter(r.epoch(7))) for r in ranks)
    assert batch0.view1.shape == batch1.view1.shape == (2, 3, CROP, CROP)


def test_without_drop_last_every_image_is_seen_and_ranks_stay_equal(tiny_image_folder):
    ranks = [_loader(tiny_image_folder, batch_size=4, rank=r, world_size=2, drop_last=False)
             for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == math.ceil(N_IMAGES / 4)
    per_rank = [[b.tolist() for b in r.plan.batch_indices(0)] for r in ranks]
    seen = set()
    for b0, b1 in zip(*per_rank):
        assert len(b0) == len(b1)
        seen |= set(b0) | set(b1)
    assert seen == set(range(N_IMAGES))
    # 15 = 3 * 4 + 3: the last global batch holds 3 images, padded to 4 so each rank gets 2
    assert len(per_rank[0][-1]) == 2
    single = _loader(tiny_image_folder, batch_size=4, drop_last=False)
    assert [len(b) for b in single.plan.batch_indices(0)] == [4, 4, 4, 3]


def test_batch_larger_than_dataset_with_drop_last_is_an_error(tiny_image_folder):
    with pytest.raises(ValueError, match="batch_size = 32"):
        _loader(tiny_image_folder, batch_size=32)


# ---------------------------------------------------------------- bad images


@pytest.fixture()
def folder_with_bad_images(tmp_path) -> tuple[Path, list[str]]:
    """One class: 4 good JPEGs, a truncated JPEG and a text file named .jpg."""
    rng = np.random.default_rng(1)
    cls = tmp_path / "only"
    cls.mkdir()
    for i in range(4):
        _noise(rng, 24, 24).save(cls / f"good{i}.jpg")
    _noise(rng, 48, 48).save(cls / "truncated.jpg")
    data = (cls / "truncated.jpg").read_bytes()
    (cls / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (cls / "text.jpg").write_text("this is not a JPEG")
    return tmp_path, [str(cls / "truncated.jpg"), str(cls / "text.jpg")]


def test_bad_images_are_skipped_with_one_warning_per_path(folder_with_bad_images):
    root, bad = folder_with_bad_images
    loader = _loader(root, batch_size=6, on_bad_image="skip")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in (0, 1):
            (batch,) = loader.epoch(epoch)
            assert batch.view1.shape == (6, 3, CROP, CROP)  # the batch keeps its size
    messages = [str(w.message) for w in caught if issubclass(w.category, BadImageWarning)]
    for path in bad:
        assert sum(path in m for m in messages) == 1
    assert len(messages) == 2


@pytest.mark.parametrize("which,num_workers", [(0, 0), (1, 2)])
def test_bad_image_is_an_error_naming_the_path(folder_with_bad_images, which, num_workers):
    root, bad = folder_with_bad_images
    other = Path(bad[1 - which])
    other.rename(other.with_suffix(".txt"))  # leave exactly one bad image
    loader = _loader(root, batch_size=5, on_bad_image="error", num_workers=num_workers)
    with pytest.raises(BadImageError, match=re.escape(bad[which])):
        list(loader.epoch(0))
