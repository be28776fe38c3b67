"""The ffcv backend: two-crop decoder, order, sharding and seeding of the two-view loader."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipelines import DataConfig, FFCVOptions, build_loader
from pipelines.crops import sample_crop
from pipelines.loader import LoaderPlan
from pipelines.policy import AugmentConfig

pytestmark = pytest.mark.ffcv  # the whole module exercises FFCV: skipped without it (conftest.py)
N = 24  # images in the test beton; label i = sample index i
BATCH = 6
CROP = 16


def _ramp(i: int, h: int, w: int) -> np.ndarray:
    """R = row, G = column, B = 10 x image index: a crop's mean R / G locate its box."""
    rows, cols = np.mgrid[0:h, 0:w]
    return np.stack([rows, cols, np.full((h, w), 10 * i)], axis=-1).astype(np.uint8)


def _sizes(i: int) -> tuple[int, int]:
    return 40 + (7 * i) % 50, 40 + (13 * i) % 60  # varied sizes and aspect ratios


@pytest.fixture(scope="module")
def beton(tmp_path_factory) -> str:
    """N ramp images written with FFCV's own writer, half JPEG and half raw, label = index."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    class Ramps:
        def __len__(self):
            return N

        def __getitem__(self, i):
            return _ramp(i, *_sizes(i)), i

    path = str(tmp_path_factory.mktemp("ffcv") / "ramps.beton")
    np.random.seed(0)  # the writer's raw/jpg choice in proportion mode
    fields = {"image": RGBImageField(write_mode="proportion", compress_probability=0.5,
                                     jpeg_quality=95),
              "label": IntField()}
    DatasetWriter(path, fields, num_workers=1).from_indexed_dataset(Ramps())
    return path


def _augment() -> AugmentConfig:
    augment = AugmentConfig()
    augment.set_crop_size(CROP)
    augment.view2.crop_scale = (0.3, 0.6)  # differs from view 1: the decoder must use both
    return augment


def _loader(path, seed=0, rank=0, world_size=1, num_workers=1, batch_size=BATCH, **kw):
    data = DataConfig(backend="ffcv", path=path, batch_size=batch_size,
                      num_workers=num_workers, **kw)
    return build_loader(data, _augment(), torch.device("cpu"), rank=rank,
                        world_size=world_size, seed=seed)


@pytest.fixture(scope="module")
def loader(beton):
    return _loader(beton, seed=3)


class _FakeRng:
    """Plays uniforms u to sample_crop the way crop_from_uniforms reads them: try t uses
    u[4t], u[4t+1] for area and ratio and u[4t+2], u[4t+3] for the position."""

    def __init__(self, u):
        self.u, self.uniforms, self.ints = u, 0, 0

    def uniform(self, lo, hi):
        t, k = divmod(self.uniforms, 2)
        self.uniforms += 1
        return lo + (hi - lo) * self.u[4 * t + k]

    def integers(self, lo, hi):
        t = (self.uniforms - 1) // 2
        self.ints += 1
        return lo + int(math.floor(self.u[4 * t + 1 + self.ints] * (hi - lo)))


def test_decoder_torchvision_crop_is_sample_crop():
    """The numba torchvision sampler is the reference algorithm (pipelines.crops.sample_crop)."""
    from pipelines.ffcv_decode import DRAWS, crop_from_uniforms

    rng = np.random.default_rng(0)
    fallbacks = 0
    for case in range(300):
        h, w = (int(x) for x in rng.integers(1, 300, 2))
        if case % 3 == 0:  # extreme shapes and large areas exercise the fallback
            h, w = int(rng.integers(1, 8)), int(rng.integers(100, 300))
        scale = (0.9, 1.0) if case % 3 == 0 else (0.08, 1.0)
        ratio = (3 / 4, 4 / 3)
        u = rng.random(DRAWS)
        mine = crop_from_uniforms(u, h, w, scale[0], scale[1], math.log(ratio[0]), math.log(ratio[1]))
        ref = sample_crop(_FakeRng(u), h, w, scale, ratio, "torchvision")
        assert tuple(int(v) for v in mine) == ref, (h, w, scale)
        fallbacks += ref[2:] == (h, min(w, round(h * 4 / 3)))
    assert fallbacks > 0


def test_decoder_official_crop_is_sample_crop():
    from pipelines.ffcv_decode import official_crop_from_uniforms

    rng = np.random.default_rng(0)
    for _ in range(500):
        h, w = (int(x) for x in rng.integers(1, 300, 2))
        u = rng.random(4)
        mine = official_crop_from_uniforms(u, h, w, 0.08, 1.0, math.log(3 / 4), math.log(4 / 3))
        ref = sample_crop(_FakeRng(u), h, w, (0.08, 1.0), (3 / 4, 4 / 3), "official")
        assert tuple(int(v) for v in mine) == ref, (h, w)


def test_uniforms_are_keyed_and_uniform():
    from pipelines.ffcv_decode import fill_uniforms

    a, b, c = np.empty(4000), np.empty(4000), np.empty(4000)
    fill_uniforms(np.uint64(7), 5, 0, a)
    fill_uniforms(np.uint64(7), 5, 1, b)
    fill_uniforms(np.uint64(7), 6, 0, c)
    again = np.empty(4000)
    fill_uniforms(np.uint64(7), 5, 0, again)
    np.testing.assert_array_equal(a, again)
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
    for x in (a, b, c):
        assert 0.0 <= x.min() and x.max() < 1.0
        assert abs(x.mean() - 0.5) < 0.02 and abs(x.var() - 1 / 12) < 0.01
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.06


def test_raw_crops_are_the_keyed_boxes(loader):
    """Each view's crop is the box drawn for (epoch key, sample index, view), resized: its
    mean R (row) and G (column) are the box's center; B is the sample's own index."""
    from pipelines.ffcv_decode import DRAWS, fill_uniforms, official_crop_from_uniforms
    from pipelines.seeding import derive_seed

    key = np.uint64(derive_seed(loader.plan.seed, 0))
    scales = (loader.augment.view1.crop_scale, loader.augment.view2.crop_scale)
    ratio = loader.augment.view1.crop_ratio
    checked = 0
    for crops, labels in loader.raw_batches(0):
        assert crops.shape == (BATCH, 2, CROP, CROP, 3) and crops.dtype == torch.uint8
        for crop, index in zip(crops.numpy().astype(float), labels.numpy().ravel()):
            assert abs(crop[..., 2].mean() - 10 * index) < 4  # the right image (JPEG: ~1-3 off)
            h_img, w_img = _sizes(int(index))
            for view in range(2):
                u = np.empty(DRAWS)
                fill_uniforms(key, int(index), view, u)
                top, left, h, w = official_crop_from_uniforms(u, h_img, w_img, *scales[view],
                                                              math.log(ratio[0]), math.log(ratio[1]))
                assert abs(crop[view, ..., 0].mean() - (top + (h - 1) / 2)) < 1.5
                assert abs(crop[view, ..., 1].mean() - (left + (w - 1) / 2)) < 1.5
                checked += 1
    assert checked == 2 * N


def test_two_views_of_the_asked_size_and_each_image_once(loader):
    assert len(loader) == N // BATCH
    seen = []
    for batch in loader.epoch(0):
        for view in (batch.view1, batch.view2):
            assert view.shape == (BATCH, 3, CROP, CROP) and view.dtype == torch.float32
            assert view.is_contiguous(memory_format=torch.channels_last)
            assert torch.isfinite(view).all()
        assert not torch.allclose(batch.view1, batch.view2)
        assert batch.labels.dtype == torch.int64 and batch.labels.shape == (BATCH,)
        seen += batch.labels.tolist()
    assert sorted(seen) == list(range(N))
    order1 = [i for b in loader.epoch(1) for i in b.labels.tolist()]
    assert sorted(order1) == list(range(N)) and order1 != seen  # a new permutation per epoch


def test_same_seed_same_batches_any_thread_count_and_resume(beton, loader):
    """A second loader with the same seed but 2 threads gives the same first batch; a resumed
    epoch (start_step) gives what the uninterrupted one gave from that step on."""
    other = _loader(beton, seed=3, num_workers=2)
    a, b = next(iter(loader.epoch(0))), next(iter(other.epoch(0)))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    full = list(loader.epoch(2))
    resumed = list(loader.epoch(2, start_step=2))
    assert len(resumed) == len(full) - 2
    for want, got in zip(full[2:], resumed):
        for x, y in zip(want, got):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    c = next(iter(loader.epoch(1)))
    assert not torch.equal(a.view1, c.view1)


def _span(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def test_a_batch_never_shares_memory_with_a_buffer_ffcv_refills(loader, monkeypatch):
    """FFCV refills a batch's buffer once the next batch is taken. Every batch handed to the step
    holds memory of its own (no overlap with any buffer FFCV handed out this epoch) and keeps its
    values while every later batch is taken; and no batch is taken, nor the epoch's buffers let
    go, while the copy out of the previous one is unfenced (CopyFence: on CUDA an event the host
    synchronizes; the same calls on a CPU, where the copy is synchronous)."""
    import pipelines.ffcv as backend

    log: list[str] = []
    buffers: list[tuple[int, int]] = []
    real_next = backend.FFCVLoader._next

    def take(epoch_iter):
        item = real_next(epoch_iter)
        log.append("take")
        buffers.extend(_span(t) for t in item or ())
        return item

    monkeypatch.setattr(backend.FFCVLoader, "_next", staticmethod(take))
    for name in ("record", "wait"):
        real = getattr(backend.CopyFence, name)
        monkeypatch.setattr(backend.CopyFence, name,
                            lambda self, _real=real, _name=name: (log.append(_name), _real(self))[1])
    kept, values = [], []
    for batch in loader.epoch(4):
        kept.append(batch)
        values.append([t.clone() for t in batch])
    assert len(kept) == len(loader) and len(buffers) == 2 * len(kept)
    for batch, before in zip(kept, values):
        for t, v in zip(batch, before):
            assert torch.equal(t, v)  # unchanged by the batches taken after it
            lo, hi = _span(t)
            assert all(hi <= b_lo or lo >= b_hi for b_lo, b_hi in buffers)
    unfenced = False
    for entry in log:
        if entry == "take":
            assert not unfenced, log
        unfenced = entry == "record" or (unfenced and entry != "wait")
    assert not unfenced and log.count("record") == len(kept), log


def test_two_ranks_cover_the_dataset_without_overlap(beton):
    """Rank 0 and rank 1 of a world of 2: disjoint shards whose union is the dataset."""
    ranks = [_loader(beton, seed=5, rank=r, world_size=2, batch_size=2 * 4) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == N // 8
    shards = [[i for b in r.epoch(0) for i in b.labels.tolist()] for r in ranks]
    assert all(len(s) == N // 2 for s in shards)
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(N))


@pytest.mark.parametrize("n,world,batch", [(24, 2, 8), (25, 3, 6), (10, 4, 4), (31, 2, 4)])
def test_quasi_random_blocks_are_disjoint_and_equal(n, world, batch):
    plans = [LoaderPlan(n, batch, r, world, rank_blocks=True, drop_last=False) for r in range(world)]
    blocks = [p.block().tolist() for p in plans]
    assert all(len(b) == n // world for b in blocks)
    assert sorted(i for b in blocks for i in b) == list(range(world * (n // world)))
    assert {p.steps for p in plans} == {math.ceil((n // world) / (batch // world))}


def test_quasi_random_order_and_process_cache(beton):
    """quasi_random order with FFCV's process cache: every image of the rank's block once."""
    q = _loader(beton, seed=1, batch_size=4, drop_last=False,
                ffcv=FFCVOptions(order="quasi_random", os_cache=False))
    labels = [i for crops, lab in q.raw_batches(0) for i in lab.numpy().ravel().tolist()]
    assert sorted(labels) == list(range(N))
    again = [i for crops, lab in q.raw_batches(0) for i in lab.numpy().ravel().tolist()]
    assert labels == again


def test_quasi_random_never_gives_a_rank_a_last_batch_of_one_image(beton):
    # 24 images on 2 ranks: blocks of 12, per-rank batches of 11: the 2nd step would hold 1 image
    ranks = [_loader(beton, seed=1, rank=r, world_size=2, batch_size=22, drop_last=False,
                     ffcv=FFCVOptions(order="quasi_random")) for r in range(2)]
    for q in ranks:
        steps = [lab.numpy().ravel().tolist() for crops, lab in q.raw_batches(0)]
        assert [len(s) for s in steps] == [11, 2]
        assert steps[1][1] == steps[0][0]  # topped up with the block's first image of the epoch
        assert sorted({i for s in steps for i in s}) == q.plan.block().tolist()


def test_missing_ffcv_says_what_to_install(monkeypatch):
    import builtins

    import pipelines.ffcv as backend

    real_import = builtins.__import__

    def no_ffcv(name, *args, **kwargs):
        if name == "ffcv" or name.startswith("ffcv."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ffcv)
    with pytest.raises(ImportError, match="install_ffcv.sh"):
        backend.require_ffcv()


# ---------------------------------------------------------------- the same box, the same pixels as the folder path

PHOTO_SIZES = [(72, 96), (96, 72), (30, 40), (150, 200), (61, 47), (120, 90)]  # small ones: crops get enlarged
FIDELITY_CROP = 48


def _photo(i: int) -> np.ndarray:
    """A photo-like image: the demo's shapes over noisy colour blotches, with sharp edges."""
    from pipelines.demo import SHAPES, render, shape_mask

    h, w = PHOTO_SIZES[i]
    side = max(h, w)
    image = render(shape_mask(SHAPES[i % len(SHAPES)]), side, np.random.default_rng(i))
    return np.ascontiguousarray(image[:h, :w])


@pytest.fixture(scope="module")
def photo_beton(tmp_path_factory) -> str:
    """The photos stored raw (exact pixels), so that only the crop resize can differ."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    class Photos:
        def __len__(self):
            return len(PHOTO_SIZES)

        def __getitem__(self, i):
            return _photo(i), i

    path = str(tmp_path_factory.mktemp("ffcv") / "photos.beton")
    fields = {"image": RGBImageField(write_mode="raw"), "label": IntField()}
    DatasetWriter(path, fields, num_workers=1).from_indexed_dataset(Photos())
    return path


def _ffcv_vs_folder(beton_path: str, interpolation: str) -> np.ndarray:
    """|ffcv crop - folder crop| over every pixel of 8 epochs of boxes, for the same boxes."""
    from PIL import Image

    from pipelines.ffcv_decode import DRAWS, fill_uniforms, official_crop_from_uniforms
    from pipelines.folder import resized_crop
    from pipelines.seeding import derive_seed

    augment = AugmentConfig()
    augment.set_crop_size(FIDELITY_CROP)
    data = DataConfig(backend="ffcv", path=beton_path, batch_size=len(PHOTO_SIZES), num_workers=1,
                      ffcv=FFCVOptions(interpolation=interpolation))
    loader = build_loader(data, augment, torch.device("cpu"), seed=1)
    log_ratio = np.log(augment.view1.crop_ratio)
    diffs = []
    for epoch in range(8):
        key = np.uint64(derive_seed(1, epoch))
        for crops, labels in loader.raw_batches(epoch):
            for crop, index in zip(crops.numpy(), labels.numpy().ravel()):
                photo = _photo(int(index))
                for view in range(2):
                    u = np.empty(DRAWS)
                    fill_uniforms(key, int(index), view, u)
                    box = official_crop_from_uniforms(u, *photo.shape[:2], 0.08, 1.0, *log_ratio)
                    folder = resized_crop(Image.fromarray(photo), tuple(int(v) for v in box), FIDELITY_CROP)
                    diffs.append(np.abs(crop[view].astype(int) - folder.astype(int)))
    return np.stack(diffs)


def test_ffcv_crop_has_the_folder_paths_pixels(photo_beton):
    """Cubic: Pillow's resampler reimplemented, so the same box gives the folder path's pixels up
    to Pillow's choice of which pass runs first (measured here: mean 0.09, max 8 levels of 255).
    Area (OpenCV INTER_AREA, FFCV's own): nearest-like when enlarging (measured: mean 1.6, max 72)."""
    cubic = _ffcv_vs_folder(photo_beton, "cubic")
    area = _ffcv_vs_folder(photo_beton, "area")
    print(f"cubic: mean {cubic.mean():.3f} max {cubic.max()}; area: mean {area.mean():.3f} max {area.max()}")
    assert cubic.mean() < 0.2 and cubic.max() <= 12
    assert area.mean() > 5 * max(cubic.mean(), 0.2)  # the test tells the two resizes apart
