"""`fastbyol convert`: ImageFolder / ImageNet trees -> .beton, class maps, bad files, atomicity."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import convert as convert_mod
from pipelines.convert import add_convert_arguments, run_convert
from pipelines.images import BadImageError
from pipelines.sources import class_map_path, read_val_labels, scan_source

H, W = 20, 28  # below max_resolution: raw pixels are stored unchanged
CMYK_COLOR = (200, 60, 30)
GRAY_LEVEL = 90


def _noise(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict:
    """4 classes: a (2 noise JPEGs + a CMYK JPEG), b (1 + grayscale JPEG + truncated JPEG),
    c (1 + a PNG saved as .JPEG), d (empty). Returns paths and the expected RGB of each file."""
    root = tmp_path_factory.mktemp("tree") / "train"
    for c in "abcd":
        (root / c).mkdir(parents=True)
    expected = {}  # path -> (label, RGB array the beton must hold, exact?)

    def jpeg(path: Path, array: np.ndarray, label: int) -> None:
        Image.fromarray(array).save(path, quality=95)
        with Image.open(path) as im:  # JPEG is lossy: the truth is the decoded file
            expected[str(path)] = (label, np.asarray(im.convert("RGB")))

    jpeg(root / "a" / "0.JPEG", _noise(0), 0)
    jpeg(root / "a" / "1.JPEG", _noise(1), 0)
    jpeg(root / "b" / "0.JPEG", _noise(2), 1)
    jpeg(root / "c" / "0.JPEG", _noise(3), 2)
    Image.new("RGB", (W, H), CMYK_COLOR).convert("CMYK").save(root / "a" / "cmyk.JPEG", quality=95)
    Image.new("L", (W, H), GRAY_LEVEL).save(root / "b" / "gray.JPEG", quality=95)
    png = _noise(4)
    Image.fromarray(png).save(root / "c" / "png.JPEG", format="PNG")  # lossless: exact pixels
    expected[str(root / "a" / "cmyk.JPEG")] = (0, np.broadcast_to(np.uint8(CMYK_COLOR), (H, W, 3)))
    expected[str(root / "b" / "gray.JPEG")] = (1, np.full((H, W, 3), GRAY_LEVEL, np.uint8))
    expected[str(root / "c" / "png.JPEG")] = (2, png)
    data = (root / "a" / "0.JPEG").read_bytes()
    (root / "b" / "truncated.JPEG").write_bytes(data[: len(data) // 2])
    return {"root": root, "expected": expected, "bad": str(root / "b" / "truncated.JPEG")}


def read_beton(path: Path) -> list[tuple[np.ndarray, int]]:
    """(image, label) of every sample, read with ffcv's Reader and the raw bytes of the file
    (raw write mode only): independent of FFCV's decoders and of our loader."""
    from ffcv.reader import Reader

    reader = Reader(str(path))
    assert list(reader.handlers) == ["image", "label"]
    data = np.fromfile(path, dtype=np.uint8)
    samples = []
    for meta in reader.metadata:
        image, label = meta["f0"], meta["f1"]
        assert image["mode"] == 1, "expected raw mode"
        h, w, ptr = int(image["height"]), int(image["width"]), int(image["data_ptr"])
        samples.append((data[ptr:ptr + h * w * 3].reshape(h, w, 3), int(label)))
    return samples


@pytest.fixture(scope="module")
def converted(tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "train.beton"
    summary = convert_mod.convert(tree["root"], out, write_mode="raw", num_workers=2,
                                  progress=False)
    return out, summary


@pytest.mark.ffcv
def test_counts_class_map_and_bad_file(tree, converted):
    out, summary = converted
    assert summary.images == len(tree["expected"]) == 7
    assert summary.classes == 4
    assert summary.skipped and [p for p, _ in summary.skipped] == [tree["bad"]]
    assert "truncated" in summary.skipped[0][1]
    assert summary.empty_classes == ["d"]
    assert summary.bytes == out.stat().st_size > 0
    mapping = json.loads(class_map_path(out).read_text())
    assert mapping == {"a": 0, "b": 1, "c": 2, "d": 3}
    assert sorted(p.name for p in out.parent.iterdir()) == ["train.beton", "train.classes.json"]
    assert tree["bad"] in summary.report()


@pytest.mark.ffcv
def test_raw_pixels_and_labels_match_the_sources(tree, converted):
    out, _ = converted
    samples = read_beton(out)
    assert len(samples) == len(tree["expected"])
    unmatched = list(samples)
    for path, (label, truth) in tree["expected"].items():
        # The closest stored image (CMYK and gray go through a JPEG round trip, so not exact)
        errs = [np.abs(img.astype(int) - truth).mean() if img.shape == truth.shape else 1e9
                for img, _ in unmatched]
        i = int(np.argmin(errs))
        img, stored_label = unmatched.pop(i)
        assert stored_label == label, path
        if path.endswith("cmyk.JPEG"):
            assert np.abs(img.reshape(-1, 3).mean(0) - CMYK_COLOR).max() < 4, path
        elif path.endswith("gray.JPEG"):
            assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all()
            assert abs(img.mean() - GRAY_LEVEL) < 2, path
        else:  # the decoded source file, pixel for pixel (the PNG: the original array)
            np.testing.assert_array_equal(img, truth, err_msg=path)


@pytest.mark.ffcv
def test_bad_file_fatal_leaves_no_beton(tree, tmp_path):
    out = tmp_path / "x.beton"
    with pytest.raises(BadImageError, match="truncated.JPEG"):
        convert_mod.convert(tree["root"], out, on_bad_image="error", num_workers=1, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.ffcv
def test_interrupted_write_leaves_no_beton(tree, tmp_path, monkeypatch):
    """A failure in a writer process mid-way (here: a file that passed the check but fails
    when read) aborts the conversion, names the file, and removes the temporary file."""
    from pipelines import ffcv_writer

    real = ffcv_writer.load_rgb
    victim = str(tree["root"] / "b" / "0.JPEG")

    def flaky(path, max_side=None):
        if path == victim:
            raise BadImageError(f"{path}: vanished")
        return real(path, max_side)

    monkeypatch.setattr(ffcv_writer, "load_rgb", flaky)  # inherited by the forked writers
    out = tmp_path / "x.beton"
    with pytest.raises(RuntimeError, match="vanished"):
        convert_mod.convert(tree["root"], out, num_workers=2, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.ffcv
def test_flat_val_with_csv_and_train_class_map(tree, converted, tmp_path, capsys):
    """ImageNet val as Kaggle ships it: flat folder + LOC_val_solution.csv two levels up."""
    out, _ = converted
    val = tmp_path / "ILSVRC" / "val"
    val.mkdir(parents=True)
    rows = {"ILSVRC2012_val_00000001": "c", "ILSVRC2012_val_00000002": "a",
            "ILSVRC2012_val_00000003": "c"}
    for i, stem in enumerate(rows):
        Image.fromarray(_noise(10 + i)).save(val / f"{stem}.JPEG")
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n"
        + "".join(f"{stem},{c} 1 2 10 12 {c} 3 4 5 6\n" for stem, c in rows.items())
        + "ILSVRC2012_val_00000099,b 1 1 2 2\n"  # a row without a file is fine
    )
    assert read_val_labels(tmp_path / "LOC_val_solution.csv")["ILSVRC2012_val_00000002"] == "a"

    parser = argparse.ArgumentParser()
    add_convert_arguments(parser)
    val_out = tmp_path / "val.beton"
    args = parser.parse_args([str(val), str(val_out), "--class-map", str(class_map_path(out)),
                              "--write-mode", "raw", "--workers", "1", "--no-progress"])
    assert run_convert(args) == 0
    assert f"wrote {val_out}" in capsys.readouterr().out
    train_map = json.loads(class_map_path(out).read_text())
    assert json.loads(class_map_path(val_out).read_text()) == train_map
    labels = sorted(label for _, label in read_beton(val_out))
    assert labels == sorted(train_map[c] for c in rows.values())  # [0, 2, 2] with train's map


def test_scan_errors_name_the_problem(tree, tmp_path):
    with pytest.raises(ValueError, match="'zebra'"):
        (tmp_path / "zebra").mkdir()
        Image.fromarray(_noise(0)).save(tmp_path / "zebra" / "0.jpg")
        scan_source(tmp_path, class_map={"a": 0, "b": 1})
    with pytest.raises(ValueError, match="train/ and val/"):
        imagenet = tmp_path / "imagenet"
        for split in ("train", "val"):
            (imagenet / split / "n1").mkdir(parents=True)
            Image.fromarray(_noise(0)).save(imagenet / split / "n1" / "0.jpg")
        scan_source(imagenet)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(_noise(0)).save(flat / "0.jpg")
    with pytest.raises(ValueError, match="--val-labels"):
        scan_source(flat)


def test_subset_keeps_the_first_n_per_class(tree):
    paths, labels, mapping = scan_source(tree["root"], subset=1)
    assert mapping == {"a": 0, "b": 1, "c": 2, "d": 3}
    assert labels == [0, 1, 2]
    assert [Path(p).name for p in paths] == ["0.JPEG", "0.JPEG", "0.JPEG"]


def test_options_are_checked_by_name_before_any_work(tmp_path):
    """Each option's declared check (ConvertOptions) rejects a bad value by name, before the source
    is even looked at (the source here does not exist)."""
    missing = tmp_path / "nope"
    bad = {"jpeg_quality": 0, "write_mode": "png", "compress_probability": 1.5, "max_resolution": 4,
           "num_workers": 0, "subset": 0, "on_bad_image": "ignore"}
    for key, value in bad.items():
        with pytest.raises(ValueError, match=rf"^convert\.{key} = {value!r}: expected "):
            convert_mod.convert(missing, tmp_path / "x.beton", **{key: value})
    with pytest.raises(TypeError, match="max_res"):
        convert_mod.convert(missing, tmp_path / "x.beton", max_res=256)  # the CLI's name, not an option
    assert list(tmp_path.iterdir()) == []
