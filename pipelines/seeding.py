"""Random draws derived from (seed, epoch, step, ...) instead of global RNG state.

A resumed run, a different number of loader workers or a different prefetch depth then cannot
change what a step sees: every draw is a pure function of its coordinates.
"""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed that depends on `seed` and every key (order matters), well mixed."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *(int(k) & 0xFFFFFFFF for k in keys)])
    return int(state.generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def generator(device: torch.device | str, seed: int, *keys: int) -> torch.Generator:
    """A torch.Generator on `device` seeded with derive_seed(seed, *keys)."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, *keys))
    return g


def numpy_rng(seed: int, *keys: int) -> np.random.Generator:
    """A numpy Generator seeded with derive_seed(seed, *keys) (for CPU-side crops and order)."""
    return np.random.default_rng(derive_seed(seed, *keys))
