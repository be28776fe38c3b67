"""benchmarks/scaling_model.py: each term of the step-time model against arithmetic done by hand."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import scaling_model as sm  # noqa: E402

NET = sm.Network()


def comm(forward: int = 0, backward: int = 0, buckets: tuple[int, ...] = (), after: tuple[int, ...] = (),
         buffers: int = 0) -> sm.StepComm:
    return sm.StepComm("t", False, [64] * forward, [64] * backward, list(buckets), list(after), buffers)


def flat(seconds: float) -> sm.Cost:
    return lambda kind, nbytes, ranks: seconds


def test_ring_all_reduce_in_one_node_is_nccls_formula():
    # NCCL tuning.cc, LL protocol: base 6.6 us + 2 (N - 1) NVLink hops of 0.6 us; bytes at busbw / 4
    n, size = 8, 1024
    expected = (6.6 + 2 * (n - 1) * 0.6) * 1e-6 + size * 2 * (n - 1) / n / (NET.intra_bw / 4)
    seconds, how = sm.collective_time("all_reduce", size, n, NET)
    assert how == "ring/LL" and seconds == pytest.approx(expected)


def test_small_collectives_over_many_nodes_tree_all_reduce_ring_all_gather():
    reduce_1024, how = sm.collective_time("all_reduce", 64, 1024, NET)
    assert how.startswith("tree")  # log2(nodes) network hops
    gathers = [sm.collective_time("all_gather", 64 * n, n, NET)[0] for n in (16, 64, 256, 1024)]
    assert gathers == sorted(gathers) and gathers[-1] > 10 * reduce_1024  # ring only: N-1 hops
    assert sm.collective_time("all_reduce", 10**9, 1, NET) == (0.0, "-")


def test_sweep_fit_recovers_a_line(tmp_path):
    path = tmp_path / "sweep.jsonl"
    path.write_text("".join(json.dumps({"batch": b, "step_time_s": 0.01 + 0.002 * b, "images_per_sec": 0}) + "\n"
                            for b in (64, 128, 256, 512)))
    fit = sm.sweep_compute(path)
    assert fit.fixed_s == pytest.approx(0.01) and fit.per_image_s == pytest.approx(0.002)
    assert fit.step(16) == pytest.approx(0.042)


def test_every_blocking_collective_adds_its_cost():
    c = comm(forward=10, backward=6, buffers=100)
    compute = sm.Compute(1.0, 0.0, "test")
    s = sm.step_time(c, compute, 8, 4, flat(0.01), sm.Options(log_every=2, broadcast_buffers=True))
    assert s.terms["syncbn_forward"] == pytest.approx(10 * (0.01 + sm.FIGURES["host_sync"][0]))
    assert s.terms["syncbn_backward"] == pytest.approx(6 * 0.01)
    assert s.terms["buffers"] == pytest.approx(0.01) and s.terms["loop"] == pytest.approx(2 * 0.01 / 2)
    assert sm.step_time(c, compute, 8, 4, flat(0.01), sm.Options()).terms["buffers"] == 0.0  # fastbyol's DDP
    assert s.terms["ddp_exposed"] == 0
    assert sm.step_time(c, compute, 8, 4, flat(0.0)).total == pytest.approx(1.0 + 10 * sm.FIGURES["host_sync"][0])
    # per-GPU BatchNorm: no BN collective at all; one rank: nothing but compute
    assert sm.step_time(c, compute, 8, 4, flat(0.01), sm.Options(sync_bn=False)).terms["syncbn_forward"] == 0
    assert sm.step_time(c, compute, 1, 4, flat(0.01)).total == 1.0


def test_ddp_hides_what_fits_in_the_backward_after_its_bucket_is_ready():
    compute = sm.Compute(1.0, 0.0, "test")  # backward: 0.5 s over 10 calls, 0.05 s each
    no_bn = sm.Options(sync_bn=False, broadcast_buffers=False)
    ready_at_start = comm(backward=10, buckets=(1,), after=(0,))
    assert sm.step_time(ready_at_start, compute, 8, 4, flat(0.4), no_bn).terms["ddp_exposed"] == 0
    assert sm.step_time(ready_at_start, compute, 8, 4, flat(0.7), no_bn).terms["ddp_exposed"] == pytest.approx(0.2)
    ready_half_way = comm(backward=10, buckets=(1,), after=(5,))  # per view: the last pass only
    assert sm.step_time(ready_half_way, compute, 8, 4, flat(0.4), no_bn).terms["ddp_exposed"] == pytest.approx(0.15)


def test_bn_waits_behind_a_bucket_on_the_shared_communicator_but_not_in_its_own_group():
    compute = sm.Compute(1.0, 0.0, "test")  # backward: 0.5 s over 2 calls, due at 0.25 s and 0.5 s
    c = comm(backward=2, buckets=(1,), after=(0,))  # a 1-byte bucket all-reduced from the start

    def cost(kind: str, nbytes: float, ranks: int) -> float:
        return 0.6 if nbytes == 1 else 0.1  # the bucket runs 0 - 0.6 s; each BN call takes 0.1 s
    opt = sm.Options(broadcast_buffers=False)
    shared = sm.step_time(c, compute, 16, 4, cost, opt)
    assert shared.terms["syncbn_backward"] == pytest.approx(0.35 + 2 * 0.1)  # the first call waits 0.6 - 0.25
    grouped = sm.step_time(c, compute, 16, 4, cost, sm.Options(group=8, broadcast_buffers=False))
    assert grouped.terms["syncbn_backward"] == pytest.approx(2 * 0.1)


def test_the_recorded_inventory_loads_with_the_layer_counts():
    inventory = sm.load_inventory()
    r50 = inventory[("50x1", False)]
    assert len(r50.forward_channels) == 2 * (55 + 54) and len(r50.backward_channels) == 2 * 55
    assert len(inventory[("50x1", True)].forward_channels) == 55 + 54
    assert len(r50.bucket_after) == len(r50.buckets) and r50.bucket_after == sorted(r50.bucket_after)
    assert r50.bucket_after[0] >= 55  # per view: nothing before the first view's backward is done
