"""Which images each rank loads at each step: one rule for every file-reading backend.

Epoch e is numpy_rng(seed, e).permutation(n) cut into global batches; rank r takes the r-th of
world_size equal contiguous slices of each. Steps per epoch do not depend on the world size, so a
run can resume on another number of ranks. Without drop_last, the incomplete last global batch
is padded to a multiple of world_size with the epoch's first images (as DistributedSampler does),
so every rank takes the same number of steps.
"""

from __future__ import annotations

import math

import numpy as np

from pipelines.seeding import numpy_rng


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
        chunk = order[step * global_batch:(step + 1) * global_batch]
        pad = -len(chunk) % world_size
        if pad:
            chunk = np.concatenate([chunk, np.resize(order, pad)])
        share = len(chunk) // world_size
        batches.append(chunk[rank * share:(rank + 1) * share])
    return batches
