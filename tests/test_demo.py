"""The demo dataset: layout, decodability, determinism, idempotence, atomic writes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import demo
from pipelines.demo import MARKER, SHAPES, make_demo_dataset, make_demo_splits
from pipelines.sources import find_images


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.jpg"))}


def test_layout_counts_and_images_decode(tmp_path):
    path = make_demo_dataset(tmp_path / "demo", num_classes=4, images_per_class=6, size=32)
    assert path == tmp_path / "demo" / "train"
    paths, labels, classes = find_images(path)
    assert classes == [f"{i:02d}_{SHAPES[i]}" for i in range(4)]
    assert len(paths) == 24 and np.bincount(labels).tolist() == [6, 6, 6, 6]
    for p in paths:
        with Image.open(p) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size == (32, 32)
            image.load()
    assert not [p for p in (tmp_path / "demo").iterdir() if p.name.startswith(".")]  # no temp left


def test_deterministic_and_splits_differ(tmp_path):
    a = make_demo_dataset(tmp_path / "a", num_classes=3, images_per_class=4, size=32, seed=5)
    b = make_demo_dataset(tmp_path / "b", num_classes=3, images_per_class=4, size=32, seed=5)
    assert _digest(a) == _digest(b)
    c = make_demo_dataset(tmp_path / "c", num_classes=3, images_per_class=4, size=32, seed=6)
    assert _digest(a) != _digest(c)
    splits = make_demo_splits(tmp_path / "a", num_classes=3, train_per_class=4, val_per_class=4,
                              size=32, seed=5)
    assert splits["train"] == a and _digest(splits["train"]) == _digest(a)
    train_files, val_files = _digest(splits["train"]), _digest(splits["val"])
    assert train_files.keys() == val_files.keys()
    assert not set(train_files.values()) & set(val_files.values())  # no image in both splits


def test_idempotent_and_rebuilt_when_parameters_change(tmp_path, monkeypatch):
    path = make_demo_dataset(tmp_path, num_classes=2, images_per_class=3, size=32)
    before = _digest(path)

    def fail(*args, **kwargs):
        raise AssertionError("a complete dataset must not be rewritten")

    monkeypatch.setattr(demo, "_write", fail)
    assert make_demo_dataset(tmp_path, num_classes=2, images_per_class=3, size=32) == path
    monkeypatch.undo()
    assert _digest(path) == before
    make_demo_dataset(tmp_path, num_classes=2, images_per_class=5, size=32)
    assert len(_digest(path)) == 10


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def render_then_fail(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return np.zeros((32, 32, 3), np.uint8)

    monkeypatch.setattr(demo, "render", render_then_fail)
    with pytest.raises(KeyboardInterrupt):
        make_demo_dataset(tmp_path, num_classes=2, images_per_class=3, size=32)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_a_folder_that_is_not_a_demo_dataset(tmp_path):
    (tmp_path / "train" / "mine").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="not a fastbyol demo dataset"):
        make_demo_dataset(tmp_path, num_classes=2, images_per_class=2, size=32)
    assert (tmp_path / "train" / "mine").is_dir() and not (tmp_path / "train" / MARKER).exists()


def test_class_is_not_told_by_mean_colour(tmp_path):
    # Nearest class centroid on each image's mean RGB, fitted on train, scored on val: with
    # colours drawn independently of the class it must stay near chance (10 %).
    splits = make_demo_splits(tmp_path, num_classes=10, train_per_class=20, val_per_class=10,
                              size=32)
    features = {}
    for split, root in splits.items():
        paths, labels, _ = find_images(root)
        rgb = np.stack([np.asarray(Image.open(p), np.float32).mean((0, 1)) for p in paths])
        features[split] = rgb, np.array(labels)
    x, y = features["train"]
    centroids = np.stack([x[y == c].mean(0) for c in range(10)])
    xv, yv = features["val"]
    predicted = np.argmin(((xv[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predicted == yv).mean() < 0.3


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="split"):
        make_demo_dataset(tmp_path, split="test")
    with pytest.raises(ValueError, match="num_classes"):
        make_demo_dataset(tmp_path, num_classes=len(SHAPES) + 1)
