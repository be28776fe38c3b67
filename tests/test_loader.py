"""The loader contract: one plan of steps and indices per rank, one constructor shape, one table."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest

import pipelines
from pipelines.loader import BACKENDS, DataConfig, LoaderPlan
from pipelines.seeding import numpy_rng


@pytest.mark.parametrize("n, batch, world, drop_last", [(50, 12, 1, True), (50, 12, 2, False), (7, 4, 2, False)])
def test_plan_steps_batch_and_indices(n, batch, world, drop_last):
    plans = [LoaderPlan(n, batch, r, world, seed=3, drop_last=drop_last) for r in range(world)]
    steps = n // batch if drop_last else math.ceil(n / batch)
    order = numpy_rng(3, 1).permutation(n)  # epoch 1's permutation, computed independently
    for p in plans:
        assert p.steps == steps and p.batch_size == batch // world
    per_rank = [p.batch_indices(1) for p in plans]
    for step in range(steps):
        got = np.concatenate([b[step] for b in per_rank])
        want = order[step * batch:(step + 1) * batch]
        assert set(want.tolist()) <= set(got.tolist())
        assert set(got.tolist()) - set(want.tolist()) <= set(order[:world].tolist())  # padding: the epoch's first
    resumed = plans[0].batch_indices(1, start_step=2)
    assert [b.tolist() for b in resumed] == [b.tolist() for b in per_rank[0][2:]]
    assert plans[0].batch_indices(1, start_step=steps) == []


def test_plan_rejects_bad_rank_start_and_no_step():
    with pytest.raises(ValueError, match="rank = 2"):
        LoaderPlan(10, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="not divisible"):
        LoaderPlan(10, 5, rank=0, world_size=2)
    with pytest.raises(ValueError, match="batch_size = 16 leaves no step for 10 images"):
        LoaderPlan(10, 16)
    with pytest.raises(ValueError, match="start_step = 4"):
        LoaderPlan(10, 4).batch_indices(0, start_step=4)


def test_plan_of_a_data_config():
    data = DataConfig(path="x", batch_size=8, drop_last=False)
    plan = LoaderPlan.of(data, 30, rank=1, world_size=2, seed=5)
    assert (plan.global_batch, plan.drop_last, plan.rank, plan.seed, plan.steps) == (8, False, 1, 5, 4)


def test_every_backend_has_one_class_of_one_constructor_shape():
    assert tuple(pipelines.LOADERS) == BACKENDS
    shape = ["self", "data", "augment", "device", "rank", "world_size", "seed"]
    for cls in pipelines.LOADERS.values():
        params = inspect.signature(cls.__init__).parameters
        assert list(params)[:len(shape)] == shape, cls.__name__
        extra = list(params.values())[len(shape):]  # a backend's own knobs, which build_loader never passes
        assert all(p.default is not inspect.Parameter.empty for p in extra), cls.__name__
