"""What a distributed step sends, and BatchNorm groups: gloo processes started by torchrun from the test.

The truths: the collectives one step must make, counted from the model's own layer list (its
BatchNorm layers, its parameters and buffers), against what benchmarks/comm_inventory.py records
of a real `train()` step on 4 ranks; and BatchNorm statistics over groups of 2 of 4 ranks against
two independent 2-rank runs on the same images. This file is also the per-rank worker.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:  # when torchrun runs this file as a script
        sys.path.insert(0, str(path))

import comm_inventory  # noqa: E402
from fastbyol import dist  # noqa: E402
from fastbyol.config import load_config  # noqa: E402
from fastbyol.step import build_components, build_model, train_step  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")

TINY = ["model.depth=18", "model.stem=cifar", "byol.hidden_dim=64", "byol.proj_dim=32", "dist.bucket_cap_mb=1"]
PER_RANK, SIZE = 2, 16
B = 2  # images per rank in the BatchNorm-group runs
TIMEOUT_S = 300


def inventory_overrides(concat: bool, world: int) -> list[str]:
    return comm_inventory.config_overrides(18, 1, concat, PER_RANK, world, SIZE, tuple(TINY))


def fixed_views(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two (n, 3, 16, 16) float64 views, the same in every process."""
    g = torch.Generator().manual_seed(99)
    return tuple(torch.randn(n, 3, SIZE, SIZE, generator=g, dtype=torch.float64) for _ in range(2))


def one_step(info: dist.DistInfo, group_size: int, images: slice) -> dict:
    """One train_step on `images` of fixed_views(4 B) (this rank's share of them): BN running
    statistics after it, and this rank's loss."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        cfg = load_config(None, [*TINY, "data.backend=synthetic", f"data.batch_size={B * info.world_size}",
                                 "train.precision=fp32", "train.device=cpu", "model.channels_last=false",
                                 f"dist.sync_bn_group_size={group_size}"], world_size=info.world_size)
        c = build_components(cfg, torch.device("cpu"), info, peak_lr=0.5)
        view1, view2 = (v[images][info.rank * B:(info.rank + 1) * B] for v in fixed_views(4 * B))
        loss = train_step(c, view1, view2, 0.5, 0.9).loss.item()
    finally:
        torch.set_default_dtype(default)
    stats = {k: v.clone() for k, v in c.byol.state_dict().items() if "running_" in k}
    return {"stats": stats, "loss": loss}


# ---------------------------------------------------------------- the per-rank worker (torchrun runs this file)


def _worker(scenario: str, workdir: Path) -> None:
    """One process group per process (a second init_process_group under torchrun hangs), and
    train() leaves it at its end: the BatchNorm-group steps first, the recorded train() last."""
    torch.set_num_threads(1)
    info = dist.launcher_env()
    if scenario == "pairs":  # two independent 2-rank runs: images 0..2B-1, then 2B..4B-1
        dist.init("cpu")
        for half in (0, 1):
            torch.save(one_step(info, 0, slice(2 * B * half, 2 * B * (half + 1))),
                       workdir / f"pair{half}_rank{info.rank}.pt")
        dist.shutdown()
        return
    concat = scenario == "concat"
    if not concat:
        dist.init("cpu")
        for k in (2, 0):
            with comm_inventory.CollectiveRecorder() as recorder:
                result = one_step(info, k, slice(None))
            result["collectives"] = comm_inventory.summarize(recorder.records)
            torch.save(result, workdir / f"four_k{k}_rank{info.rank}.pt")
    recorder, _ = comm_inventory.record_training(inventory_overrides(concat, info.world_size), str(workdir / "run"))
    if info.is_main:
        (workdir / f"inventory_concat{int(concat)}.json").write_text(
            json.dumps(comm_inventory.summarize(recorder.segment(2))))


def torchrun(scenario: str, nproc: int, workdir: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT") and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(port), __file__, scenario, str(workdir)]
    proc = subprocess.run(cmd, env=env, cwd=workdir, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory) -> Path:
    """4 ranks: the BatchNorm-group steps and a recorded train() per view; a recorded train()
    with concat_views."""
    workdir = tmp_path_factory.mktemp("four_ranks")
    torchrun("four", 4, workdir)
    torchrun("concat", 4, workdir)
    return workdir


@pytest.fixture(scope="module")
def two_pairs(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("two_pairs")
    torchrun("pairs", 2, workdir)
    return workdir


# ---------------------------------------------------------------- the inventory against the layer list


def expected_bucket_count(sizes: list[int], cap: int) -> int:
    """DDP's bucketing: parameters in turn, a bucket closes once it holds >= cap bytes."""
    count, filled = 0, 0
    for size in sizes:
        filled += size
        if filled >= cap:
            count, filled = count + 1, 0
    return count + (filled > 0)


@pytest.mark.parametrize("concat", [False, True])
def test_recorded_collectives_match_the_count_from_the_layer_list(four_ranks, concat):
    step = json.loads((four_ranks / f"inventory_concat{int(concat)}.json").read_text())
    cfg = load_config(None, inventory_overrides(concat, 4), world_size=4)
    byol = build_model(cfg)
    views = 1 if concat else 2
    bn = {name: m.num_features for name, m in byol.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    online = {n: c for n, c in bn.items() if not n.startswith("target_")}
    assert len(online) == 20 + 2 and len(bn) == 2 * 20 + 3  # ResNet-18: 20 BN; projector 1, predictor 1

    def stats_bytes(channels: int) -> int:  # CPUSyncBatchNorm: one all-reduce of (sum x, sum x^2, count) in float64
        return 8 * (2 * channels + 1)

    t = step["totals"]
    # forward: one all-reduce per BatchNorm call, online and target, once per view (or once on both)
    forward = step["syncbn_forward"]
    assert sorted(name.removeprefix("module.") for name, *_ in forward) == sorted(list(bn) * views)
    assert all(nbytes == stats_bytes(bn[name.removeprefix("module.")]) for name, _, nbytes, _ in forward)
    assert t["syncbn_forward all_reduce"]["bytes"] == views * sum(stats_bytes(c) for c in bn.values())
    # backward: one all-reduce per online BatchNorm call (the target gets no gradient)
    assert t["syncbn_backward all_reduce"]["calls"] == views * len(online)
    assert t["syncbn_backward all_reduce"]["bytes"] == views * sum(stats_bytes(c) for c in online.values())
    # DDP: every trained parameter's gradient once, in float32 buckets of >= bucket_cap_mb but the last
    params = [p.numel() * 4 for p in byol.online_parameters()]
    buckets = step["buckets"]
    assert sum(b[0] for b in buckets) == sum(params) and sum(b[1] for b in buckets) == len(params)
    cap = cfg.dist.bucket_cap_mb * 2**20
    assert all(b[0] >= cap for b in buckets[:-1])
    assert len(buckets) == expected_bucket_count(params[::-1], cap)
    # DDP's buffer broadcast before the forward: every buffer (running statistics, counters), once
    assert t["ddp_buffers broadcast"] == {**t["ddp_buffers broadcast"], "calls": 1,
                                          "bytes": sum(b.numel() * b.element_size() for b in byol.buffers())}
    # the loop's two reductions at a log step: the metric window, the stop flag (one float32)
    assert t["metric all_reduce"]["calls"] == 1 and t["stop all_reduce"] == {**t["stop all_reduce"], "calls": 1, "bytes": 4}
    assert set(t) == {"syncbn_forward all_reduce", "syncbn_backward all_reduce", "ddp_bucket all_reduce",
                      "ddp_buffers broadcast", "metric all_reduce", "stop all_reduce"}
    assert step["calls"] == views * (len(bn) + len(online)) + len(buckets) + 3


def test_gradient_buckets_wait_for_the_last_views_backward(four_ranks):
    """Per view, a parameter's gradient is whole only after the backward of both of its uses; the
    autograd engine runs one view's branch through before the other's, so no bucket is all-reduced
    before the first view's backward has passed every online BatchNorm: DDP overlaps only the last
    pass (what benchmarks/scaling_model.py assumes). With concat_views, the one pass overlaps."""
    online_bn = 20 + 2
    for concat in (False, True):
        order = json.loads((four_ranks / f"inventory_concat{int(concat)}.json").read_text())["order"]
        backward = [w for w in order if w in ("syncbn_backward", "ddp_bucket")]
        first = backward.index("ddp_bucket")
        assert (first >= online_bn) if not concat else (first < online_bn)
        assert "syncbn_backward" in backward[first:]  # buckets do overlap the rest of the backward


# ---------------------------------------------------------------- BatchNorm groups


def test_groups_of_two_of_four_ranks_equal_two_independent_two_rank_runs(four_ranks, two_pairs):
    for rank in range(4):
        grouped = torch.load(four_ranks / f"four_k2_rank{rank}.pt")
        alone = torch.load(two_pairs / f"pair{rank // 2}_rank{rank % 2}.pt")
        assert grouped["loss"] == pytest.approx(alone["loss"], rel=1e-12)
        assert grouped["stats"].keys() == alone["stats"].keys() and len(alone["stats"]) == 2 * (2 * 20 + 3)
        for key, value in alone["stats"].items():
            torch.testing.assert_close(grouped["stats"][key], value, rtol=1e-12, atol=1e-12, msg=key)
        # every BatchNorm collective ran over the 2 ranks of the group, the gradients over all 4
        sent = grouped["collectives"]
        assert sent["syncbn_forward"] and {g for *_, g in sent["syncbn_forward"]} == {2}
        assert sent["syncbn_backward"] and {g for _, g in sent["syncbn_backward"]} == {2}
        assert sent["buckets"] and {g for *_, g in sent["buckets"]} == {4}
    # and global statistics over the 4 ranks are not those of either pair
    everyone = torch.load(four_ranks / "four_k0_rank0.pt")["stats"]
    pair = torch.load(two_pairs / "pair0_rank0.pt")["stats"]
    assert max((everyone[k] - pair[k]).abs().max().item() for k in pair) > 1e-3


def test_group_size_must_divide_the_ranks():
    from fastbyol.config import ConfigError

    with pytest.raises(ConfigError, match=r"dist.sync_bn_group_size = 3: does not divide the number of ranks \(4\)"):
        load_config(None, ["data.backend=synthetic", "dist.sync_bn_group_size=3"], world_size=4)
    with pytest.raises(ConfigError, match="dist.sync_bn_group_size = -1: expected >= 0"):
        load_config(None, ["data.backend=synthetic", "dist.sync_bn_group_size=-1"])
    load_config(None, ["data.backend=synthetic", "dist.sync_bn_group_size=8"], world_size=32)
    load_config(None, ["data.backend=synthetic", "dist.sync_bn_group_size=8"], world_size=1)  # one process: no SyncBN at all


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]))
