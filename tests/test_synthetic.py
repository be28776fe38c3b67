"""The synthetic backend: random normalized views already on the device, reused every step."""

from __future__ import annotations

import pytest
import torch

from pipelines import DataConfig, build_loader
from pipelines.policy import AugmentConfig
from pipelines.synthetic import NUM_CLASSES


def _loader(rank=0, world_size=1, seed=0, batch_size=8, steps=5, size=16):
    augment = AugmentConfig()
    augment.set_crop_size(size)
    data = DataConfig(backend="synthetic", batch_size=batch_size, synthetic_steps=steps)
    return build_loader(data, augment, torch.device("cpu"), rank=rank, world_size=world_size,
                        seed=seed)


def test_batches_shape_layout_device_and_length():
    loader = _loader(world_size=2, batch_size=8, steps=5, size=16)
    assert len(loader) == 5 and loader.batch_size == 4
    batches = list(loader.epoch(0))
    assert len(batches) == 5
    for batch in batches:
        for view in (batch.view1, batch.view2):
            assert view.shape == (4, 3, 16, 16)
            assert view.dtype == torch.float32 and view.device.type == "cpu"
            assert view.is_contiguous(memory_format=torch.channels_last)
        assert batch.labels.shape == (4,) and batch.labels.dtype == torch.int64
        assert batch.labels.min() >= 0 and batch.labels.max() < NUM_CLASSES
    assert not torch.equal(batches[0].view1, batches[0].view2)
    assert batches[0].view1 is batches[-1].view1  # made once: the loader costs nothing per step


def test_views_look_normalized():
    view = _loader(batch_size=16, size=32).batch.view1
    assert abs(view.mean().item()) < 0.05 and abs(view.std().item() - 1) < 0.05


def test_start_step_and_seeding():
    loader = _loader(steps=5)
    assert len(list(loader.epoch(3, start_step=2))) == 3
    assert list(loader.epoch(0, start_step=5)) == []
    with pytest.raises(ValueError, match="start_step"):
        loader.epoch(0, start_step=6)
    assert torch.equal(loader.batch.view1, _loader(steps=5).batch.view1)  # same seed, same views
    assert not torch.equal(loader.batch.view1, _loader(seed=1).batch.view1)
    ranks = [_loader(rank=r, world_size=2).batch.view1 for r in (0, 1)]
    assert not torch.equal(*ranks)
