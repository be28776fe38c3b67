"""The loader contract every backend follows, and the plan of which images a rank loads when.

A backend is a class `Loader(data, augment, device, rank, world_size, seed)` with `batch_size`
(images per step on this rank), `len(loader)` steps per epoch (the same on every rank) and
`loader.epoch(epoch, start_step)` yielding `Batch(view1, view2, labels)`: both views float,
normalized, NCHW in channels_last memory format on the training device. `start_step` lets a
resumed run continue mid-epoch with exactly the batches an uninterrupted run would have seen.
The file-reading backends take their steps, batch size and per-step indices from one `LoaderPlan`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Protocol

import numpy as np
import torch

from pipelines.images import load_rgb
from pipelines.params import at_least, check_fields, choice, in_range
from pipelines.sharding import rank_batches, steps_per_epoch

BACKENDS = ("folder", "synthetic", "ffcv", "dali")


class Batch(NamedTuple):
    view1: torch.Tensor  # (B, 3, S, S) float, normalized, channels_last, on the device
    view2: torch.Tensor  # same shape, an independent augmentation of the same source images
    labels: torch.Tensor  # (B,) int64 class indices (synthetic: random)


class TwoViewLoader(Protocol):
    batch_size: int  # images per step on this rank

    def __len__(self) -> int: ...

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]: ...


class HasSources(Protocol):
    """A loader that reads stored images (folder, ffcv, dali; not synthetic) also gives them back
    as stored, for a person to look at beside the views (fastbyol.views)."""

    def sources(self, epoch: int, step: int, count: int) -> list[np.ndarray]:
        """The first `count` images of this rank's batch `step` of `epoch`, in batch order, as
        stored: (H, W, 3) uint8 each."""
        ...


def decode_sources(paths: list[str], indices: np.ndarray, count: int) -> list[np.ndarray]:
    """`sources` for the backends that read image files: the files' decoded pixels."""
    return [load_rgb(paths[int(i)]) for i in indices[:count]]


@dataclass
class FFCVOptions:
    order: str = choice("random", ("random", "quasi_random"))  # random | quasi_random (for datasets larger than RAM)
    os_cache: bool = True  # True: memory-map the file (page cache); False: FFCV process cache
    interpolation: str = choice("cubic", ("cubic", "area"))  # crop resize: cubic (Pillow's antialiased bicubic, the folder backend's pixels) / area (OpenCV INTER_AREA: faster, nearest-like when enlarging)


@dataclass
class DALIOptions:
    decode: str = choice("once", ("once", "roi"))  # once: decode each JPEG once, crop twice | roi: ROI-decode each crop
    device: str = choice("auto", ("auto", "gpu", "cpu"))  # auto (gpu when CUDA is available) | gpu | cpu
    hw_decoder_load: float = in_range(0.65, 0.0, 1.0)  # share of images sent to the A100/H100 hardware JPEG decoder


@dataclass
class DataConfig:
    backend: str = choice("folder", BACKENDS, "one of " + ", ".join(BACKENDS))  # folder | synthetic | ffcv | dali
    path: str = ""  # ImageFolder root (folder, dali), .beton file (ffcv); unused by synthetic
    batch_size: int = at_least(4096, 1, "a positive integer")  # global batch (all ranks); each rank gets batch_size / world_size
    num_workers: int = at_least(8, 0)  # CPU workers (DataLoader workers, FFCV threads, DALI threads)
    prefetch: int = at_least(2, 1)  # batches prepared ahead of the training step
    side_stream: bool = True  # folder, ffcv on CUDA: batch k+1's copy and augmentation on a side stream while step k runs
    drop_last: bool = True  # drop the incomplete last batch (keeps every step the same size); false: keep it, topped up to at least 2 images per rank (BatchNorm's minimum) with the epoch's first images
    on_bad_image: str = choice("skip", ("skip", "error"))  # skip | error: what a corrupt or unreadable image does
    synthetic_steps: int = at_least(100, 1)  # steps per epoch of the synthetic backend
    demo: bool = False  # write the demo image set (train/ and val/ beside data.path) if data.path is missing
    ffcv: FFCVOptions = field(default_factory=FFCVOptions)
    dali: DALIOptions = field(default_factory=DALIOptions)

    def validate(self) -> None:
        check_fields(self, "data")
        check_fields(self.ffcv, "data.ffcv")
        check_fields(self.dali, "data.dali")
        if self.backend != "synthetic" and not self.path:
            raise ValueError(f"data.path is empty: the {self.backend} backend needs a data path")


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """The batch each rank loads; the global batch must split evenly across ranks."""
    if global_batch % world_size:
        raise ValueError(
            f"data.batch_size = {global_batch} is not divisible by the number of ranks ({world_size})"
        )
    return global_batch // world_size


def check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank = {rank}: expected 0 <= rank < world_size = {world_size}")


def check_start_step(start_step: int, steps: int) -> None:
    """A resumed epoch starts at a step of the epoch, or at its end (nothing left to load)."""
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step = {start_step}: expected 0 <= start_step <= {steps}")


@dataclass(frozen=True)
class LoaderPlan:
    """Which of `num_images` images rank `rank` loads at each step (pipelines.sharding's rule).

    rank_blocks (ffcv quasi_random): rank r reads only its own contiguous block of
    num_images // world_size images, so an epoch has that block's batches; the backend orders
    the block itself. Construction fails with one line when no step fits.
    """

    num_images: int
    global_batch: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    drop_last: bool = True
    rank_blocks: bool = False

    def __post_init__(self) -> None:
        check_rank(self.rank, self.world_size)
        per_rank_batch(self.global_batch, self.world_size)
        if self.steps == 0:
            raise ValueError(
                f"data.batch_size = {self.global_batch} leaves no step for {self.num_images} images on "
                f"{self.world_size} rank(s) with data.drop_last true: lower the batch size or set "
                "data.drop_last false"
            )

    @classmethod
    def of(cls, data: DataConfig, num_images: int, rank: int, world_size: int, seed: int,
           rank_blocks: bool = False) -> LoaderPlan:
        return cls(num_images, data.batch_size, rank, world_size, seed, data.drop_last, rank_blocks)

    @property
    def batch_size(self) -> int:
        """Images per step on this rank."""
        return self.global_batch // self.world_size

    @property
    def steps(self) -> int:
        """Steps per epoch, the same on every rank."""
        if self.rank_blocks:
            return steps_per_epoch(self.num_images // self.world_size, self.batch_size, self.drop_last)
        return steps_per_epoch(self.num_images, self.global_batch, self.drop_last)

    def block(self) -> np.ndarray:
        """rank_blocks: the contiguous block of image indices this rank owns."""
        size = self.num_images // self.world_size
        return np.arange(self.rank * size, (self.rank + 1) * size, dtype=np.uint64)

    def batch_indices(self, epoch: int, start_step: int = 0) -> list[np.ndarray]:
        """This rank's image indices for steps start_step.. of `epoch` (global shuffle order)."""
        check_start_step(start_step, self.steps)
        return rank_batches(self.num_images, self.global_batch, self.rank, self.world_size,
                            self.seed, epoch, self.drop_last)[start_step:]
