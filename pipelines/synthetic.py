"""The synthetic backend (`data.backend: synthetic`): random views already on the device.

It exists to time the model step alone: the views are made once per loader and the same
tensors are yielded at every step, so loading costs nothing.
"""

from __future__ import annotations

from typing import Iterator

import torch

from pipelines.loader import Batch, DataConfig, check_rank, check_start_step, per_rank_batch
from pipelines.policy import AugmentConfig
from pipelines.seeding import generator

NUM_CLASSES = 1000  # labels are random in [0, NUM_CLASSES), like ImageNet's


class SyntheticLoader:
    """A TwoViewLoader yielding one random batch of the per-rank batch size for
    data.synthetic_steps steps per epoch."""

    def __init__(self, data: DataConfig, augment: AugmentConfig, device: torch.device | str,
                 rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        check_rank(rank, world_size)
        self.batch_size = per_rank_batch(data.batch_size, world_size)
        self.batch = random_batch(self.batch_size, augment.view1.crop_size, torch.device(device), seed, rank)
        self.steps = data.synthetic_steps

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """Yield the batch for steps start_step..len(self)-1 (the epoch number changes nothing)."""
        check_start_step(start_step, self.steps)
        return iter([self.batch] * (self.steps - start_step))


def random_batch(
    batch_size: int,
    size: int,
    device: torch.device | str,
    seed: int = 0,
    rank: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Batch:
    """Two independent (batch_size, 3, size, size) standard-normal views (already "normalized"),
    channels_last on `device`, and int64 labels in [0, NUM_CLASSES); drawn from (seed, rank)."""
    g = generator(device, seed, rank)
    shape = (batch_size, 3, size, size)
    view1, view2 = (
        torch.randn(shape, generator=g, device=device, dtype=dtype)
        .contiguous(memory_format=torch.channels_last)
        for _ in range(2)
    )
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g, device=device)
    return Batch(view1, view2, labels)
