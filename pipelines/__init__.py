"""Data pipelines: from files to two augmented views on the device. Knows nothing of BYOL.

Every backend is a `TwoViewLoader`: `len(loader)` steps per epoch (the same on every rank) and
`loader.epoch(epoch, start_step)` yielding `Batch(view1, view2, labels)` with both views float,
normalized, NCHW in channels_last memory format on the training device. `start_step` lets a
resumed run continue mid-epoch with exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Protocol

import torch

from pipelines.policy import AugmentConfig, ViewPolicy

BACKENDS = ("folder", "synthetic", "ffcv", "dali")


class Batch(NamedTuple):
    view1: torch.Tensor  # (B, 3, S, S) float, normalized, channels_last, on the device
    view2: torch.Tensor  # same shape, an independent augmentation of the same source images
    labels: torch.Tensor  # (B,) int64 class indices (synthetic: random)


class TwoViewLoader(Protocol):
    batch_size: int  # images per step on this rank

    def __len__(self) -> int: ...

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]: ...


@dataclass
class FFCVOptions:
    order: str = "random"  # random | quasi_random (for datasets larger than RAM)
    os_cache: bool = True  # True: memory-map the file (page cache); False: FFCV process cache


@dataclass
class DALIOptions:
    decode: str = "once"  # once: decode each JPEG once, crop twice | roi: ROI-decode each crop
    device: str = "auto"  # auto (gpu when CUDA is available) | gpu | cpu
    hw_decoder_load: float = 0.65  # share of images sent to the A100/H100 hardware JPEG decoder


@dataclass
class DataConfig:
    backend: str = "folder"  # folder | synthetic | ffcv | dali
    path: str = ""  # ImageFolder root (folder, dali), .beton file (ffcv); unused by synthetic
    batch_size: int = 4096  # global batch (all ranks); each rank gets batch_size / world_size
    num_workers: int = 8  # CPU workers (DataLoader workers, FFCV threads, DALI threads)
    prefetch: int = 2  # batches prepared ahead of the training step
    drop_last: bool = True  # drop the incomplete last batch (keeps every step the same size)
    on_bad_image: str = "skip"  # skip | error: what a corrupt or unreadable image does
    synthetic_steps: int = 100  # steps per epoch of the synthetic backend
    demo: bool = False  # write the demo image set (train/ and val/ beside data.path) if data.path is missing
    ffcv: FFCVOptions = field(default_factory=FFCVOptions)
    dali: DALIOptions = field(default_factory=DALIOptions)

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"data.backend = {self.backend!r}: expected one of {', '.join(BACKENDS)}")
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size = {self.batch_size}: expected a positive integer")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers = {self.num_workers}: expected >= 0")
        if self.prefetch < 1:
            raise ValueError(f"data.prefetch = {self.prefetch}: expected >= 1")
        if self.on_bad_image not in ("skip", "error"):
            raise ValueError(f"data.on_bad_image = {self.on_bad_image!r}: expected skip or error")
        if self.synthetic_steps < 1:
            raise ValueError(f"data.synthetic_steps = {self.synthetic_steps}: expected >= 1")
        if self.ffcv.order not in ("random", "quasi_random"):
            raise ValueError(f"data.ffcv.order = {self.ffcv.order!r}: expected random or quasi_random")
        if self.dali.decode not in ("once", "roi"):
            raise ValueError(f"data.dali.decode = {self.dali.decode!r}: expected once or roi")
        if self.dali.device not in ("auto", "gpu", "cpu"):
            raise ValueError(f"data.dali.device = {self.dali.device!r}: expected auto, gpu or cpu")
        if self.backend != "synthetic" and not self.path:
            raise ValueError(f"data.path is empty: the {self.backend} backend needs a data path")


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """The batch each rank loads; the global batch must split evenly across ranks."""
    if global_batch % world_size:
        raise ValueError(
            f"data.batch_size = {global_batch} is not divisible by the number of ranks ({world_size})"
        )
    return global_batch // world_size


def _ensure_demo(path: str) -> None:
    """Create the demo set if `path` (which must be <root>/train) does not exist yet."""
    from pathlib import Path

    from pipelines.demo import make_demo_splits

    target = Path(path)
    if target.name != "train":
        raise ValueError(f"data.demo = true needs data.path ending in /train (the demo's train split), got {path!r}")
    if not target.exists():
        make_demo_splits(target.parent)


def build_loader(
    data: DataConfig,
    augment: AugmentConfig,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
) -> TwoViewLoader:
    """The two-view loader of `data.backend`, sharded for `rank` of `world_size`."""
    data.validate()
    if data.demo:
        _ensure_demo(data.path)
    module = importlib.import_module(f"pipelines.{data.backend}")
    return module.build(data, augment, device, rank=rank, world_size=world_size, seed=seed)


__all__ = [
    "AugmentConfig", "Batch", "DataConfig", "DALIOptions", "FFCVOptions", "TwoViewLoader",
    "ViewPolicy", "build_loader", "per_rank_batch",
]
