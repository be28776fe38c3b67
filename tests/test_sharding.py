"""The epoch-order and rank rule shared by the folder, ffcv and dali backends, by its invariants."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.seeding import numpy_rng
from pipelines.sharding import rank_batches, steps_per_epoch


@pytest.mark.parametrize("n, batch, world", [(50, 12, 1), (50, 12, 3), (48, 12, 4), (7, 4, 2)])
@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_split_each_global_batch_of_the_seeded_permutation(n, batch, world, drop_last):
    per_rank = [rank_batches(n, batch, r, world, seed=7, epoch=2, drop_last=drop_last) for r in range(world)]
    steps = n // batch if drop_last else -(-n // batch)
    assert steps_per_epoch(n, batch, drop_last) == steps
    assert all(len(b) == steps for b in per_rank)  # every rank takes the same number of steps
    order = numpy_rng(7, 2).permutation(n)
    seen = []
    for step in range(steps):
        shares = [per_rank[r][step] for r in range(world)]
        assert len({len(s) for s in shares}) == 1  # equal shares
        joined = np.concatenate(shares)
        want = order[step * batch:(step + 1) * batch]
        assert joined[:len(want)].tolist() == want.tolist()  # rank r holds the r-th slice, in order
        assert joined[len(want):].tolist() == order[:len(joined) - len(want)].tolist()  # pad: first images
        seen.extend(want.tolist())
    if not drop_last:
        assert sorted(seen) == list(range(n))  # every image once per epoch


def test_epochs_and_seeds_change_the_order_but_not_the_step_count():
    a = rank_batches(40, 8, 0, 2, seed=0, epoch=0, drop_last=True)
    assert [x.tolist() for x in a] != [x.tolist() for x in rank_batches(40, 8, 0, 2, seed=0, epoch=1, drop_last=True)]
    assert [x.tolist() for x in a] != [x.tolist() for x in rank_batches(40, 8, 0, 2, seed=1, epoch=0, drop_last=True)]
    assert [x.tolist() for x in a] == [x.tolist() for x in rank_batches(40, 8, 0, 2, seed=0, epoch=0, drop_last=True)]
    assert steps_per_epoch(40, 8, True) == len(rank_batches(40, 8, 0, 4, seed=0, epoch=0, drop_last=True))


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("n", [33, 34, 35, 39])  # 32 + 1, + 2, + 3, + 7 over global batches of 8
def test_no_rank_gets_a_last_batch_too_small_for_batchnorm(n, world):
    """drop_last false: a last step of one image per rank ends a run in BatchNorm ("Expected more
    than 1 value per channel when training"). It is topped up to 2 per rank with the epoch's first
    images, as the pad to a multiple of the ranks already is; steps per epoch stay as they were."""
    per_rank = [rank_batches(n, 8, r, world, seed=3, epoch=1, drop_last=False) for r in range(world)]
    assert all(len(b) == steps_per_epoch(n, 8, False) == 5 for b in per_rank)
    assert all(min(len(x) for x in batches) >= 2 for batches in per_rank)
    assert all(len(x) <= 8 // world for batches in per_rank for x in batches)  # never above the configured batch
    last = np.concatenate([batches[-1] for batches in per_rank])
    order = numpy_rng(3, 1).permutation(n)
    rest = n - 32
    assert last[:rest].tolist() == order[32:].tolist()  # the remainder itself, in order
    assert last[rest:].tolist() == order[:len(last) - rest].tolist()  # then the epoch's first images
    assert len(last) == max(-(-rest // world), 2) * world  # no more padding than needed
