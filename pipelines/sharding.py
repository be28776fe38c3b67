"""Which images each rank loads at each step: one rule for every file-reading backend.

Epoch e is numpy_rng(seed, e).permutation(n) cut into global batches; rank r takes the r-th of
world_size equal contiguous slices of each. Steps per epoch do not depend on the world size, so a
run can resume on another number of ranks. Without drop_last, the incomplete last global batch
is padded to a multiple of world_size with the epoch's first images (as DistributedSampler does),
so every rank takes the same number of steps, and to at least MIN_RANK_BATCH images per rank:
a training BatchNorm cannot normalize one value per channel (the heads' BatchNorm1d sees one per
image), so a last step of one image per rank would end the run. Padding, not dropping, keeps the
steps per epoch independent of the world size.
"""

from __future__ import annotations

import math

import numpy as np

from pipelines.seeding import numpy_rng

MIN_RANK_BATCH = 2  # the fewest images per rank a training BatchNorm can normalize


def steps_per_epoch(n: int, global_batch: int, drop_last: bool) -> int:
    """Steps in an epoch of n images: full global batches, plus a partial one if not drop_last."""
    return n // global_batch if drop_last else math.ceil(n / global_batch)


def rank_batches(
    n: int, global_batch: int, rank: int, world_size: int, seed: int, epoch: int, drop_last: bool
) -> list[np.ndarray]:
    """Indices (into the n images) of this rank's images at every step of `epoch`, one array per step."""
    order = numpy_rng(seed, epoch).permutation(n)
    batches = []
    for step in range(steps_per_epoch(n, global_batch, drop_last)):
        chunk = pad_last_batch(order[step * global_batch:(step + 1) * global_batch], order, global_batch, world_size)
        share = len(chunk) // world_size
        batches.append(chunk[rank * share:(rank + 1) * share])
    return batches


def pad_last_batch(chunk: np.ndarray, order: np.ndarray, global_batch: int, world_size: int = 1) -> np.ndarray:
    """`chunk` (a global batch cut from the epoch's `order`) padded with the order's first images to
    a multiple of world_size and to at least MIN_RANK_BATCH per rank, never beyond the configured
    per-rank batch; a full batch comes back as it is."""
    share = max(math.ceil(len(chunk) / world_size), min(MIN_RANK_BATCH, global_batch // world_size))
    pad = share * world_size - len(chunk)
    return np.concatenate([chunk, np.resize(order, pad)]) if pad > 0 else chunk
