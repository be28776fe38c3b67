"""Labelled images for evaluation: the (train, val) folder pair, its transforms and batches.

Test images: short side resized to image_size*256/224, then a center crop of image_size (the
paper's 256 -> 224). Below 128 px (CIFAR-sized data, the demo) the whole image is kept: short side
resized to image_size, then the center crop. Training images (linear evaluation, fine-tuning):
random resized crop + flip. Every random draw (crops, flips, subsets) is a function of
(seed, epoch, index), and loading never touches the global RNG, so the kNN monitor does not change
the training run it watches.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipelines.crops import sample_crop
from pipelines.images import decode_rgb
from pipelines.policy import IMAGENET_MEAN, IMAGENET_STD
from pipelines.seeding import numpy_rng
from pipelines.sources import find_images

SMALL_IMAGE = 128  # below this test size, the test transform keeps the whole image (no 256/224 margin)
TRAIN_CROP_SCALE = (0.08, 1.0)  # random-resized-crop of linear evaluation and fine-tuning
TRAIN_CROP_RATIO = (3 / 4, 4 / 3)


def eval_resize(image_size: int, resize_ratio: float | None = None) -> int:
    """Short side (pixels) the test transform resizes to before its center crop of `image_size`.

    Default ratio: 256/224 at 128 px and above (the paper: 256 then 224), 1 below (whole image).
    """
    if resize_ratio is None:
        resize_ratio = 256 / 224 if image_size >= SMALL_IMAGE else 1.0
    if resize_ratio < 1:
        raise ValueError(f"resize_ratio = {resize_ratio}: expected >= 1 (the crop must fit the resized image)")
    return max(image_size, round(image_size * resize_ratio))


def center_view(image: Image.Image, image_size: int, resize: int) -> Image.Image:
    """Resize the short side to `resize` (bicubic, antialiased), then center crop image_size^2."""
    w, h = image.size
    if min(w, h) != resize:
        scale = resize / min(w, h)
        w, h = max(resize, round(w * scale)), max(resize, round(h * scale))
        image = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - image_size) // 2, (h - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


def random_view(image: Image.Image, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Random resized crop (area 0.08-1, ratio 3/4-4/3) to image_size^2, then a flip with p 0.5."""
    top, left, h, w = sample_crop(rng, image.height, image.width, TRAIN_CROP_SCALE, TRAIN_CROP_RATIO)
    image = image.crop((left, top, left + w, top + h)).resize((image_size, image_size), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


class LabeledImages(Dataset):
    """(uint8 (3, S, S) image, label) pairs; items are addressed by index or (epoch, index).

    train=False: the test transform (deterministic). train=True: random_view drawn from
    numpy_rng(seed, epoch, index), so any worker count gives the same images.
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int], image_size: int, train: bool = False,
                 seed: int = 0, resize_ratio: float | None = None) -> None:
        self.paths, self.labels = list(paths), list(labels)
        self.image_size, self.train, self.seed = image_size, train, seed
        self.resize = eval_resize(image_size, resize_ratio)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image = decode_rgb(self.paths[index])
        if self.train:
            image = random_view(image, self.image_size, numpy_rng(self.seed, epoch, index))
        else:
            image = center_view(image, self.image_size, self.resize)
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous(), self.labels[index]


def labeled_pair(train_path: str | os.PathLike, val_path: str | os.PathLike) -> tuple[list[str], list[int], list[str], list[int], list[str]]:
    """(train paths, train labels, val paths, val labels, classes) of two ImageFolders.

    Val labels index the train classes by folder name, so a val folder with fewer classes still
    lines up; a val class absent from train is an error.
    """
    train_paths, train_labels, classes = find_images(train_path)
    val_paths, val_labels, val_classes = find_images(val_path)
    unknown = sorted(set(val_classes) - set(classes))
    if unknown:
        raise ValueError(f"{val_path}: classes {unknown[:5]} are not among the {len(classes)} classes of {train_path}")
    index = {name: i for i, name in enumerate(classes)}
    val_labels = [index[val_classes[y]] for y in val_labels]
    return train_paths, train_labels, val_paths, val_labels, classes


@dataclass(frozen=True)
class EvalImages:
    """How evaluation images become model inputs: size, normalization, batching, memory format."""

    image_size: int
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    batch_size: int = 256
    num_workers: int = 4
    channels_last: bool = False
    resize_ratio: float | None = None  # test resize / crop; None: 256/224 from 128 px, else 1

    def batches(self, paths: Sequence[str], labels: Sequence[int], batches: list[list], device: torch.device,
                train: bool = False, seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(normalized float32 (B, 3, S, S) input, int64 labels) on `device` for each batch of
        `batches` (lists of indices, or of (epoch, index) keys for train=True's random views)."""
        dataset = LabeledImages(paths, labels, self.image_size, train=train, seed=seed, resize_ratio=self.resize_ratio)
        # An explicit generator: the DataLoader would otherwise draw its seed from the global torch RNG,
        # and the kNN monitor would shift the random state of the training run it watches.
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=self.num_workers,
                            pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0))
        for x, y in loader:
            yield self.inputs(x, device), y.to(device, non_blocking=True)

    def inputs(self, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        """uint8 (B, 3, S, S) -> normalized float32 on `device`, as the training views are."""
        x = x.to(device, non_blocking=True).float().div_(255.0)
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        x = (x - mean) / torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


@dataclass
class EvalData:
    """A labelled (train, val) pair and how its images become inputs."""

    train_paths: list[str]
    train_labels: list[int]
    val_paths: list[str]
    val_labels: list[int]
    classes: list[str]
    images: EvalImages = field(default_factory=lambda: EvalImages(224))

    @classmethod
    def from_folders(cls, train_path: str | os.PathLike, val_path: str | os.PathLike, image_size: int,
                     **options) -> EvalData:
        """The pair of two ImageFolders; `options` are EvalImages fields."""
        return cls(*labeled_pair(train_path, val_path), images=EvalImages(image_size, **options))

    def val_batches(self, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, b = len(self.val_paths), self.images.batch_size
        return self.images.batches(self.val_paths, self.val_labels, [list(range(i, min(n, i + b))) for i in range(0, n, b)],
                                   device)

    def summary(self) -> dict:
        return {"num_train": len(self.train_paths), "num_val": len(self.val_paths), "num_classes": len(self.classes),
                "image_size": self.images.image_size,
                "eval_resize": eval_resize(self.images.image_size, self.images.resize_ratio)}


def label_subset(paths: Sequence[str], labels: Sequence[int], *, fraction: float | None = None,
                 subset_file: str | os.PathLike | None = None, root: str | os.PathLike | None = None,
                 seed: int = 0) -> list[int]:
    """Sorted indices of a labeled subset of (paths, labels).

    fraction: round(fraction * n_c) images of each class c (at least one), drawn by
    numpy_rng(seed, c) - the same subset for the same seed, whatever else changes.
    subset_file: one image per line (blank lines and # comments ignored), as a path relative to
    `root` or as a bare file name (the form of SimCLR's ImageNet 1% / 10% lists).
    """
    if (fraction is None) == (subset_file is None):
        raise ValueError("label subset: give exactly one of a label fraction or a subset file")
    if subset_file is None:
        if not 0 < fraction <= 1:
            raise ValueError(f"label fraction = {fraction}: expected a value in (0, 1], e.g. 0.01 or 0.1")
        labels_np = np.asarray(labels)
        chosen = []
        for c in np.unique(labels_np):
            members = np.flatnonzero(labels_np == c)
            count = max(1, round(fraction * len(members)))
            chosen += numpy_rng(seed, int(c)).choice(members, count, replace=False).tolist()
        return sorted(chosen)
    lookup: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        lookup.setdefault(os.path.basename(p), []).append(i)
        if root is not None:
            lookup.setdefault(Path(os.path.relpath(p, root)).as_posix(), []).append(i)
    wanted = [line.strip() for line in Path(subset_file).read_text().splitlines()]
    wanted = [w for w in wanted if w and not w.startswith("#")]
    missing = [w for w in wanted if w not in lookup]
    if missing:
        raise ValueError(f"{subset_file}: {len(missing)} of {len(wanted)} entries are not images of the train "
                         f"folder, e.g. {missing[:3]}")
    ambiguous = [w for w in wanted if len(set(lookup[w])) > 1]
    if ambiguous:
        raise ValueError(f"{subset_file}: entries {ambiguous[:3]} name more than one image; use paths relative "
                         "to the train folder")
    return sorted({lookup[w][0] for w in wanted})


__all__ = ["EvalData", "EvalImages", "LabeledImages", "center_view", "eval_resize", "label_subset", "labeled_pair",
           "random_view"]
