"""Data pipelines: from files to two augmented views on the device. Knows nothing of BYOL.

The contract every backend follows (Batch, TwoViewLoader, DataConfig, LoaderPlan) is in
pipelines/loader.py; `build_loader` picks the backend's class from LOADERS. A new backend is one
module with a class of the shape `Loader(data, augment, device, rank, world_size, seed)` and one
line here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipelines.dali import DALILoader
from pipelines.demo import make_demo_splits
from pipelines.ffcv import FFCVLoader
from pipelines.folder import FolderLoader
from pipelines.loader import (
    BACKENDS, Batch, DALIOptions, DataConfig, FFCVOptions, LoaderPlan, TwoViewLoader, per_rank_batch,
)
from pipelines.policy import AugmentConfig, ViewPolicy
from pipelines.synthetic import SyntheticLoader

LOADERS: dict[str, type] = {
    "folder": FolderLoader, "synthetic": SyntheticLoader, "ffcv": FFCVLoader, "dali": DALILoader,
}
assert tuple(LOADERS) == BACKENDS, "every backend named in data.backend has a loader class"


def _ensure_demo(path: str) -> None:
    """Create the demo set if `path` (which must be <root>/train) does not exist yet."""
    target = Path(path)
    if target.name != "train":
        raise ValueError(f"data.demo = true needs data.path ending in /train (the demo's train split), got {path!r}")
    if not target.exists():
        make_demo_splits(target.parent)


def build_loader(
    data: DataConfig,
    augment: AugmentConfig,
    device: torch.device | str,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
) -> TwoViewLoader:
    """The two-view loader of `data.backend`, sharded for `rank` of `world_size`. `data` and
    `augment` are checked where they are read (fastbyol's load_config, or DataConfig.validate and
    AugmentConfig.validate for a config built in code), not again here."""
    if data.demo:
        _ensure_demo(data.path)
    return LOADERS[data.backend](data, augment, device, rank, world_size, seed)


__all__ = [
    "AugmentConfig", "BACKENDS", "Batch", "DataConfig", "DALIOptions", "FFCVOptions", "LOADERS", "LoaderPlan",
    "TwoViewLoader", "ViewPolicy", "build_loader", "per_rank_batch",
]
