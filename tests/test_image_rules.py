"""What counts as an image and what its pixels are: one set of rules for `fastbyol convert`, the
folder backend and the dali file list (issue 22, item 4).

- Links are followed, but no link loop, and each real file is indexed once; what was passed over
  is named in one warning.
- A 16-bit PNG is scaled to 8 bits (v * 255 / 65535, rounded), as DALI's decoder does, instead of
  being clipped to white.
- EXIF orientation is ignored: the stored pixels are used, as torchvision and the official BYOL
  input pipeline (TF's decode_jpeg) do; DALI's decoder is told the same (adjust_orientation off).

The truths: the files actually on disk (counted by inode), numpy's formula for the 16-bit scaling,
and PIL's own exif_transpose (which shows the tag is there and would turn the image).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.images import decode_rgb
from pipelines.sources import find_images


def save_png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


@pytest.fixture
def looped(tmp_path) -> Path:
    """root/c0: 3 images, a link to itself and a link to root (loops: the probe's 32 files became 672
    images); root/c1: 2 images and a second link to a c0 image; root/c2 -> a folder outside root
    (followed: its file is new)."""
    root = tmp_path / "root"
    for i in range(3):
        save_png(root / "c0" / f"{i}.png", i)
    for i in range(3, 5):
        save_png(root / "c1" / f"{i}.png", i)
    save_png(tmp_path / "outside" / "5.png", 5)
    os.symlink(".", root / "c0" / "selfloop")
    os.symlink("..", root / "c0" / "up")
    os.symlink("../c0/0.png", root / "c1" / "again.png")
    os.symlink(tmp_path / "outside", root / "c2")
    return root


def test_a_link_loop_is_not_followed_and_each_real_file_is_indexed_once(looped):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths, labels, classes = find_images(looped)
    assert classes == ["c0", "c1", "c2"]
    real = {os.stat(p).st_ino for p in paths}
    assert len(real) == len(paths) == 6  # the 6 files on disk, once each (the probe: 672 from 32)
    assert sorted(labels) == [0, 0, 0, 1, 1, 2]
    assert not any("selfloop" in p or "/up/" in p or "again" in p for p in paths)
    (message,) = [str(w.message) for w in caught]
    assert "selfloop" in message and "up" in message and "again.png" in message, message


@pytest.mark.dali
def test_convert_and_the_dali_list_index_the_same_files(looped, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTBYOL_CACHE", str(tmp_path / "cache"))
    from pipelines.sources import scan_source

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = find_images(looped)[0]
        converted = scan_source(looped)[0]
    assert converted == folder
    from pipelines import dali
    from pipelines.loader import DataConfig
    from pipelines.policy import AugmentConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = dali.DALILoader(DataConfig(backend="dali", path=str(looped), batch_size=2, num_workers=1),
                                 AugmentConfig(), "cpu")
    assert loader.images.paths == folder


def gray16(path: Path, side: int = 32) -> np.ndarray:
    """A 16-bit grayscale PNG ramp over the whole range; returns its values."""
    values = np.linspace(0, 65535, side * side).round().astype(np.uint16).reshape(side, side)
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")  # PIL reads it as 16-bit: the case that became white
    return values


def eight_bit(values: np.ndarray) -> np.ndarray:
    return np.round(values.astype(np.float64) * 255 / 65535)


def test_a_16_bit_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    values = gray16(tmp_path / "g16.png")
    rgb = np.asarray(decode_rgb(str(tmp_path / "g16.png")), dtype=np.float64)
    assert rgb.shape == (32, 32, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], eight_bit(values))


def whole_image_views(folder: Path, side: int, tmp_path: Path, monkeypatch) -> np.ndarray:
    """View 1 of the dali backend over `folder` (an ImageFolder of side x side images), every op
    off and the crop pinned to the whole image: the decoded pixels, as values in [0, 255]."""
    from dataclasses import replace

    from pipelines import dali
    from pipelines.loader import DataConfig
    from pipelines.policy import AugmentConfig, ViewPolicy

    monkeypatch.setenv("FASTBYOL_CACHE", str(tmp_path / "cache"))
    off = replace(ViewPolicy(), crop_size=side, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0,
                  jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
    augment = AugmentConfig(off, off, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    data = DataConfig(backend="dali", path=str(folder), batch_size=1, num_workers=1, drop_last=False)
    batches = list(dali.DALILoader(data, augment, "cpu").epoch(0))
    return torch.cat([b.view1 for b in batches]).permute(0, 2, 3, 1).numpy() * 255


@pytest.mark.dali
def test_dali_decodes_a_16_bit_png_as_the_folder_path_does(tmp_path, monkeypatch):
    (tmp_path / "data" / "c0").mkdir(parents=True)
    values = gray16(tmp_path / "data" / "c0" / "g16.png", side=16)
    (view,) = whole_image_views(tmp_path / "data", 16, tmp_path, monkeypatch)
    for c in range(3):
        assert np.abs(view[..., c] - eight_bit(values)).max() <= 1.01


def rotated_jpeg(path: Path, side: int = 16) -> np.ndarray:
    """A square JPEG, left half white, whose EXIF says 'rotate 90 degrees' (orientation 6)."""
    from PIL import ImageOps

    pixels = np.zeros((side, side, 3), np.uint8)
    pixels[:, : side // 2] = 255
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, exif=exif.tobytes(), quality=95)
    turned = np.asarray(ImageOps.exif_transpose(Image.open(path)), dtype=np.float64)
    assert turned[: side // 2].mean() > 200 > 50 > turned[side // 2:].mean()  # the tag is there: top half white
    return pixels


def left_minus_right(image: np.ndarray) -> float:
    half = image.shape[1] // 2
    return float(image[:, :half].mean() - image[:, half:].mean())


@pytest.mark.dali
def test_exif_orientation_is_ignored_on_every_path(tmp_path, monkeypatch):
    path = tmp_path / "data" / "c0" / "rotated.jpg"
    rotated_jpeg(path)
    assert left_minus_right(np.asarray(decode_rgb(str(path)), dtype=np.float64)) > 200  # folder and convert
    (view,) = whole_image_views(tmp_path / "data", 16, tmp_path, monkeypatch)
    assert left_minus_right(view) > 200  # dali: the stored pixels too, not turned
