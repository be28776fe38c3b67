"""The reference pipeline (`data.backend: folder`): a PyTorch DataLoader over an ImageFolder.

CPU workers decode each image once with PIL and cut two random resized crops (uint8); the batch
goes to the device, where `gpu_augment.make_view` does flip, color, blur, solarize and the
normalization, for batch k+1 on a side stream while step k runs (pipelines.prefetch). Every
random draw is a pure function of (seed, epoch, index or step, view), so the number of workers,
the prefetch depth and resuming mid-epoch cannot change what a step sees.
"""

from __future__ import annotations

import itertools
import warnings
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipelines.crops import sample_crop
from pipelines.gpu_augment import make_views
from pipelines.images import BadImageError, BadImageWarning, decode_rgb
from pipelines.loader import Batch, DataConfig, LoaderPlan
from pipelines.policy import AugmentConfig, ViewPolicy
from pipelines.prefetch import prefetch
from pipelines.seeding import derive_seed, numpy_rng
from pipelines.sources import find_images


def resized_crop(image: Image.Image, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """The box (top, left, h, w) of `image` resized to (size, size): (size, size, 3) uint8, bicubic.

    Crop, then resize (torchvision's resized_crop): resize(box=...) would also read pixels outside
    the box at its edges. Pillow's bicubic widens its support when shrinking (antialiased).
    """
    top, left, h, w = box
    crop = image.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BICUBIC)
    return np.array(crop)


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
        image, label = self.load(index)
        views = []
        for k, policy in enumerate(self.policies, start=1):
            rng = numpy_rng(self.seed, epoch, index, k)
            top, left, h, w = sample_crop(
                rng, image.height, image.width, policy.crop_scale, policy.crop_ratio, self.crop_sampler
            )
            crop = resized_crop(image, (top, left, h, w), policy.crop_size)
            views.append(torch.from_numpy(crop).permute(2, 0, 1).contiguous())
        return views[0], views[1], label

    def load(self, index: int) -> tuple[Image.Image, int]:
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
    """The folder backend's TwoViewLoader for one rank: data.path is an ImageFolder root.

    Each epoch's images per step come from the LoaderPlan (pipelines.sharding's rule); CPU
    workers decode and crop, the device augments.
    """

    def __init__(self, data: DataConfig, augment: AugmentConfig, device: torch.device | str,
                 rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        paths, labels, classes = find_images(data.path)
        self.dataset = TwoCropFolder(paths, labels, classes, (augment.view1, augment.view2), seed,
                                     data.on_bad_image, augment.crop_sampler)
        self.plan = LoaderPlan.of(data, len(paths), rank, world_size, seed)
        self.batch_size = self.plan.batch_size
        self.augment, self.device = augment, torch.device(device)
        self.num_workers, self.prefetch, self.side_stream = data.num_workers, data.prefetch, data.side_stream

    def __len__(self) -> int:
        return self.plan.steps

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """Yield Batch(view1, view2, labels) for steps start_step..len(self)-1 of `epoch`.

        Views are float32 (B, 3, S, S), normalized, channels_last, on the device; labels int64 (B,).
        Skipped steps are not decoded.
        """
        batches = self.plan.batch_indices(epoch, start_step)  # checks start_step before iterating
        return self._iterate(epoch, start_step, batches)

    def sources(self, epoch: int, step: int, count: int) -> list[np.ndarray]:
        """pipelines.loader.HasSources: the images of batch `step` of `epoch` (a bad one replaced as in training)."""
        return [np.asarray(self.dataset.load(int(i))[0]) for i in self.plan.batch_indices(epoch, step)[0][:count]]

    def _iterate(self, epoch: int, start_step: int, batches: list[np.ndarray]) -> Iterator[Batch]:
        if not batches:
            return
        workers = self.num_workers
        loader = DataLoader(
            self.dataset,
            batch_sampler=[[(epoch, int(i)) for i in b] for b in batches],
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=self.prefetch if workers > 0 else None,
            # The DataLoader draws its worker base seed from this generator; without one it
            # would consume the global torch RNG every epoch.
            generator=torch.Generator().manual_seed(derive_seed(self.plan.seed, epoch)),
        )
        steps = itertools.count(start_step)  # prepare runs once per batch, in order

        def prepare(item: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> Batch:
            x1, x2, labels = item  # pinned on CUDA: the copy's event guards the pinned block's reuse
            crops = (x1.to(self.device, non_blocking=True), x2.to(self.device, non_blocking=True))
            view1, view2 = make_views(crops, self.augment, self.plan.seed, epoch, next(steps), self.plan.rank)
            return Batch(view1, view2, labels.to(self.device, non_blocking=True))

        # batch k+1 copied and augmented on a side stream while step k runs (pipelines.prefetch)
        yield from prefetch(loader, prepare, self.device, self.side_stream)
