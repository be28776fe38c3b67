"""The reference pipeline (`data.backend: folder`): a PyTorch DataLoader over an ImageFolder.

CPU workers decode each image once with PIL and cut two random resized crops (uint8); the batch
goes to the device, where `gpu_augment.make_view` does flip, color, blur, solarize and the
normalization. Every random draw is a pure function of (seed, epoch, index or step, view), so the
number of workers, the prefetch depth and resuming mid-epoch cannot change what a step sees.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipelines import Batch, DataConfig, per_rank_batch
from pipelines.crops import sample_crop
from pipelines.gpu_augment import make_view
from pipelines.policy import AugmentConfig, ViewPolicy
from pipelines.sharding import rank_batches, steps_per_epoch
from pipelines.seeding import derive_seed, generator, numpy_rng

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class BadImageError(OSError):
    """An image file that cannot be read or decoded; the message names the file."""


class BadImageWarning(UserWarning):
    """A bad image was skipped and replaced (data.on_bad_image: skip)."""


def find_images(root: str | os.PathLike) -> tuple[list[str], list[int], list[str]]:
    """The ImageFolder / ImageNet layout under `root`: root/<class>/**/<image>.

    Returns (paths, labels, classes): image paths sorted within each class, their class indices,
    and the class folder names sorted (index i = classes[i]). Hidden files and folders are
    ignored; extensions are matched case-insensitively against IMAGE_EXTENSIONS.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such directory (expected an ImageFolder root)")
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a directory (expected an ImageFolder root)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(
            f"{root}: no class folders; expected the ImageFolder layout {root}/<class>/<image>"
        )
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = []
        for folder, dirs, files in os.walk(root / name, followlinks=True):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found += [
                os.path.join(folder, f) for f in files
                if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
            ]
        found.sort()
        paths += found
        labels += [label] * len(found)
    if not paths:
        raise ValueError(
            f"{root}: no images in its {len(classes)} class folders "
            f"(expected files ending in {', '.join(IMAGE_EXTENSIONS)})"
        )
    return paths, labels, classes


def decode_rgb(path: str) -> Image.Image:
    """The image at `path` fully decoded as RGB (CMYK, grayscale, palette, alpha converted)."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # convert() forces the full decode: truncation fails here
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError... for broken files
        raise BadImageError(f"{path}: cannot decode image ({type(err).__name__}: {err})") from err


class TwoCropFolder(Dataset):
    """Images of an ImageFolder, each returned as two random resized crops (uint8) and a label.

    Items are addressed by (epoch, index): the crop of view k is drawn from
    numpy_rng(seed, epoch, index, k), so any worker produces the same sample.
    """

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int],
        classes: Sequence[str],
        policies: tuple[ViewPolicy, ViewPolicy],
        seed: int = 0,
        on_bad_image: str = "skip",
        crop_sampler: str = "official",
    ) -> None:
        if on_bad_image not in ("skip", "error"):
            raise ValueError(f"on_bad_image = {on_bad_image!r}: expected skip or error")
        self.paths = list(paths)
        self.labels = list(labels)
        self.classes = list(classes)
        self.policies = policies
        self.seed = seed
        self.on_bad_image = on_bad_image
        self.crop_sampler = crop_sampler  # pipelines.crops.sample_crop's sampler
        self._bad: set[str] = set()  # per process: warn once per path, never decode it again

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(view1, view2, label): views are uint8 (3, S, S) with S = each policy's crop_size."""
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image, label = self._load(index)
        views = []
        for k, policy in enumerate(self.policies, start=1):
            rng = numpy_rng(self.seed, epoch, index, k)
            top, left, h, w = sample_crop(
                rng, image.height, image.width, policy.crop_scale, policy.crop_ratio, self.crop_sampler
            )
            size = (policy.crop_size, policy.crop_size)
            # crop, then resize (torchvision's resized_crop): resize(box=...) would also read
            # pixels outside the box at its edges
            crop = image.crop((left, top, left + w, top + h)).resize(size, Image.Resampling.BICUBIC)
            views.append(torch.from_numpy(np.array(crop)).permute(2, 0, 1).contiguous())
        return views[0], views[1], label

    def _load(self, index: int) -> tuple[Image.Image, int]:
        """The image at `index`, or (skip mode) the next readable one after it, with its label."""
        n = len(self.paths)
        for offset in range(n):
            j = (index + offset) % n
            path = self.paths[j]
            if path in self._bad:
                continue
            try:
                return decode_rgb(path), self.labels[j]
            except BadImageError as err:
                if self.on_bad_image == "error":
                    raise
                self._bad.add(path)
                warnings.warn(f"skipping bad image {err} (replaced by the next image)",
                              BadImageWarning, stacklevel=2)
        raise BadImageError(f"none of the {n} images (e.g. {self.paths[0]}) could be decoded")


class FolderLoader:
    """The folder backend's TwoViewLoader for one rank (see pipelines.TwoViewLoader).

    Each epoch is a permutation of all images from numpy_rng(seed, epoch), cut into global
    batches; rank r takes the r-th contiguous slice of each. With drop_last the incomplete
    global batch is dropped; otherwise it is kept, padded to a multiple of world_size with the
    epoch's first images (as DistributedSampler does) so every rank has the same batch size.
    """

    def __init__(
        self,
        dataset: TwoCropFolder,
        augment: AugmentConfig,
        device: torch.device | str,
        *,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        drop_last: bool = True,
        num_workers: int = 0,
        prefetch: int = 2,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank = {rank}: expected 0 <= rank < world_size = {world_size}")
        self.dataset = dataset
        self.augment = augment
        self.device = torch.device(device)
        self.batch_size = per_rank_batch(global_batch, world_size)
        self.global_batch = global_batch
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.drop_last = drop_last
        self.num_workers, self.prefetch = num_workers, prefetch
        n = len(dataset)
        self.steps = steps_per_epoch(n, global_batch, drop_last)
        if self.steps == 0:
            raise ValueError(
                f"data.batch_size = {global_batch} is larger than the dataset ({n} images) and "
                "data.drop_last is true: no step fits; lower the batch size or set drop_last false"
            )

    def __len__(self) -> int:
        return self.steps

    def batch_indices(self, epoch: int) -> list[list[int]]:
        """This rank's dataset indices for every step of `epoch` (len(self) lists)."""
        return [b.tolist() for b in rank_batches(len(self.dataset), self.global_batch, self.rank,
                                                 self.world_size, self.seed, epoch, self.drop_last)]

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """Yield Batch(view1, view2, labels) for steps start_step..len(self)-1 of `epoch`.

        Views are float32 (B, 3, S, S), normalized, channels_last, on the device; labels int64 (B,).
        Skipped steps are not decoded.
        """
        if not 0 <= start_step <= self.steps:
            raise ValueError(f"start_step = {start_step}: expected 0 <= start_step <= {self.steps}")
        return self._iterate(epoch, start_step)

    def _iterate(self, epoch: int, start_step: int) -> Iterator[Batch]:
        batches = [[(epoch, i) for i in b] for b in self.batch_indices(epoch)[start_step:]]
        if not batches:
            return
        workers = self.num_workers
        loader = DataLoader(
            self.dataset,
            batch_sampler=batches,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=self.prefetch if workers > 0 else None,
            # The DataLoader draws its worker base seed from this generator; without one it
            # would consume the global torch RNG every epoch.
            generator=torch.Generator().manual_seed(derive_seed(self.seed, epoch)),
        )
        policies = (self.augment.view1, self.augment.view2)
        mean, std = self.augment.mean, self.augment.std
        for step, (x1, x2, labels) in enumerate(loader, start=start_step):
            views = []
            for k, (x, policy) in enumerate(zip((x1, x2), policies), start=1):
                x = x.to(self.device, non_blocking=True)
                # rank is a key so that ranks do not share augmentation draws row by row
                g = generator(self.device, self.seed, epoch, step, k, self.rank)
                views.append(make_view(x, policy, g, mean, std, dtype=torch.float32))
            yield Batch(views[0], views[1], labels.to(self.device, non_blocking=True))


def build(
    data: DataConfig,
    augment: AugmentConfig,
    device: torch.device | str,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
) -> FolderLoader:
    """The folder backend for `rank` of `world_size`: data.path is an ImageFolder root."""
    paths, labels, classes = find_images(data.path)
    dataset = TwoCropFolder(
        paths, labels, classes, (augment.view1, augment.view2), seed, data.on_bad_image, augment.crop_sampler
    )
    return FolderLoader(
        dataset, augment, device,
        global_batch=data.batch_size, rank=rank, world_size=world_size, seed=seed,
        drop_last=data.drop_last, num_workers=data.num_workers, prefetch=data.prefetch,
    )
