"""pipelines.prefetch: batch k+1 prepared before batch k is handed over, in the same order on
every device (the CUDA side stream is the only part a CPU cannot run), and the backends'
prefetched batches equal to the serial path's, tensor for tensor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.prefetch import prefetch


def test_each_item_is_prepared_one_ahead_of_its_consumer():
    log: list[str] = []

    def source(n):
        for i in range(n):
            log.append(f"take {i}")
            yield i

    def prepare(i):
        log.append(f"prepare {i}")
        return (torch.full((2,), float(i)),)

    got = []
    for (t,) in prefetch(source(4), prepare, "cpu"):
        log.append(f"step {int(t[0])}")
        got.append(int(t[0]))
    assert got == [0, 1, 2, 3]
    assert log == ["take 0", "prepare 0", "take 1", "prepare 1", "step 0", "take 2", "prepare 2", "step 1",
                   "take 3", "prepare 3", "step 2", "step 3"]
    assert list(prefetch(source(0), prepare, "cpu")) == []


def test_leaving_early_closes_the_source_at_once():
    closed = []

    def source():
        try:
            yield from range(10)
        finally:
            closed.append(True)

    batches = prefetch(source(), lambda i: (torch.tensor([i]),), "cpu")
    assert int(next(batches)[0]) == 0
    batches.close()
    assert closed == [True]


# ---- the backends: prefetched == serial ---------------------------------------------------------

def _equal(a, b) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        for s, t in zip(x, y):
            assert torch.equal(s, t)


def test_folder_batches_equal_the_serial_path(tmp_path):
    from PIL import Image

    from pipelines import DataConfig, build_loader
    from pipelines.gpu_augment import make_views
    from pipelines.policy import AugmentConfig

    rng = np.random.default_rng(0)
    for i in range(10):
        (tmp_path / f"c{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (30, 36, 3), dtype=np.uint8)).save(tmp_path / f"c{i % 2}" / f"{i}.png")
    augment = AugmentConfig()
    augment.set_crop_size(16)
    data = DataConfig(backend="folder", path=str(tmp_path), batch_size=2, num_workers=0)
    loader = build_loader(data, augment, "cpu", seed=3)
    for start in (0, 2):
        serial = []
        for step, indices in enumerate(loader.plan.batch_indices(1, start), start=start):
            items = [loader.dataset[(1, int(i))] for i in indices]
            x1, x2 = (torch.stack([item[k] for item in items]) for k in (0, 1))
            views = make_views((x1, x2), augment, 3, 1, step, 0)
            serial.append((*views, torch.tensor([item[2] for item in items])))
        _equal(list(loader.epoch(1, start)), serial)


@pytest.mark.ffcv
def test_ffcv_batches_equal_the_serial_path(tmp_path):
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    from pipelines import DataConfig, build_loader
    from pipelines.gpu_augment import make_views
    from pipelines.policy import AugmentConfig

    class Noise:
        def __len__(self):
            return 12

        def __getitem__(self, i):
            return np.random.default_rng(i).integers(0, 256, (30, 40, 3), dtype=np.uint8), i

    path = str(tmp_path / "noise.beton")
    DatasetWriter(path, {"image": RGBImageField(write_mode="raw"), "label": IntField()},
                  num_workers=1).from_indexed_dataset(Noise())
    augment = AugmentConfig()
    augment.set_crop_size(16)
    loader = build_loader(DataConfig(backend="ffcv", path=path, batch_size=4, num_workers=1), augment, "cpu", seed=2)
    for start in (0, 1):
        serial = []
        for step, (crops, labels) in enumerate(loader.raw_batches(2, start), start=start):
            pair = (crops[:, 0].permute(0, 3, 1, 2), crops[:, 1].permute(0, 3, 1, 2))
            serial.append((*make_views(pair, augment, 2, 2, step, 0), labels.reshape(-1).clone()))
        _equal(list(loader.epoch(2, start)), serial)
