"""Multi-process training: 2 CPU processes over gloo, started by torchrun from the test.

The truths: a 1-process run on the concatenated batch (what DDP + global BatchNorm must equal),
bitwise equality across ranks (what DDP + the EMA must keep), the file listing of each rank's
own working directory (who wrote what). This file is also the per-rank worker: torchrun runs it
as a script (see `_worker`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # when torchrun runs this file as a script
    sys.path.insert(0, str(ROOT))

from fastbyol import checkpoint, dist  # noqa: E402
from fastbyol.config import load_config  # noqa: E402
from fastbyol.models.sync_batchnorm import convert_sync_batchnorm  # noqa: E402
from fastbyol.step import build_components, build_model, train_step  # noqa: E402
from fastbyol.train import Interrupted, train  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny models: one torch thread

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID", "GROUP_RANK")
TINY = ["model.depth=18", "model.stem=cifar", "byol.hidden_dim=64", "byol.proj_dim=32", "byol.tau_base=0.9",
        "augment.view1.crop_size=16", "augment.view2.crop_size=16", "train.precision=fp32", "train.device=cpu",
        "logging.progress=none", "logging.log_every=1", "data.num_workers=0"]
# build_components level: B images per rank, fixed views, a few steps at a high lr so parameters move
B, STEPS, LR, TAU = 4, 2, 1.0, 0.9
COMPONENTS = [*TINY, "data.backend=synthetic", f"data.batch_size={2 * B}"]
# end to end (the CLI): 24 demo images, global batch 8 -> 3 steps per epoch; 4 steps, checkpoints at 2 and 4
RUN_STEPS, RUN_CKPT = 4, 2
TIMEOUT_S = 240


def fixed_views() -> tuple[torch.Tensor, torch.Tensor]:
    """Two (2B, 3, 16, 16) float64 channels_last views, the same in every process."""
    g = torch.Generator().manual_seed(1234)
    return tuple(torch.randn(2 * B, 3, 16, 16, generator=g, dtype=torch.float64)
                 .contiguous(memory_format=torch.channels_last) for _ in range(2))


class BroadcastingDDP(torch.nn.parallel.DistributedDataParallel):
    """DDP as build_components made it before: rank 0's buffers broadcast to every rank each forward
    (DDP's default, which build_components turns off)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **{k: v for k, v in kwargs.items()
                                   if k not in ("broadcast_buffers", "forward_sync_buffers")})


def forward_buffer_sync(model: torch.nn.Module) -> bool:
    """Whether this DDP copies rank 0's buffers to every rank before each forward (both torch names)."""
    return getattr(model, "forward_sync_buffers", getattr(model, "broadcast_buffers", None))


def run_components(info: dist.DistInfo, sync_bn: bool, broadcast_buffers: bool = False) -> dict:
    """STEPS train_steps on this rank's half of fixed_views() (all of it in a single process).
    `broadcast_buffers`: DDP as before (build_components turns the buffer broadcast off).

    In float64: BYOL's gradient at initialisation is ill-conditioned, and in float32 merely
    summing a BatchNorm's statistics in another order changes some gradients by ~1% (measured),
    which a few steps at a high lr amplify. In float64 a 2-rank run and a 1-rank run must agree
    to ~1e-12; any real difference (statistics, gradient averaging, lr) stays visible.
    """
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        cfg = load_config(None, [*COMPONENTS, f"dist.sync_bn={str(sync_bn).lower()}"], world_size=info.world_size)
        with mock.patch.object(torch.nn.parallel, "DistributedDataParallel",
                               BroadcastingDDP if broadcast_buffers else torch.nn.parallel.DistributedDataParallel):
            c = build_components(cfg, torch.device("cpu"), info, peak_lr=LR)
        init = {k: v.detach().clone() for k, v in c.byol.state_dict().items()}
        view1, view2 = fixed_views()
        share = slice(info.rank * 2 * B // info.world_size, (info.rank + 1) * 2 * B // info.world_size)
        losses, local = [], []
        for _ in range(STEPS):
            out = train_step(c, view1[share], view2[share], LR, TAU)
            local.append(out.loss.item())
            losses.append(dist.all_reduce_mean(out.loss.detach()).item())
    finally:
        torch.set_default_dtype(default)
    bn_types = sorted({type(m).__name__ for m in c.byol.modules() if "Norm" in type(m).__name__})
    return {"state": {k: v.detach().clone() for k, v in c.byol.state_dict().items()}, "init": init,
            "losses": losses, "local_losses": local, "bn_types": bn_types,
            "forward_buffer_sync": forward_buffer_sync(c.model)}


# ---------------------------------------------------------------- the per-rank worker (torchrun runs this file)


def _worker(argv: list[str]) -> int:
    scenario, workdir, config = argv[0], Path(argv[1]), argv[2]
    info = dist.launcher_env()
    result: dict = {"rank": info.rank, "world_size": info.world_size}
    start = time.perf_counter()
    if scenario == "main":
        dist.init("cpu")
        cpu = torch.device("cpu")
        rows = torch.arange(10.0).reshape(5, 2)[info.rank::info.world_size]  # rank r holds rows r, r+2, ...
        result["collectives"] = {
            "gather_rows": dist.gather_rows(rows, 5).tolist(),
            "gather_floats": dist.gather_floats([float(info.rank), 0.5], cpu),
            "any_rank": [dist.any_rank(info.rank == 1, cpu), dist.any_rank(False, cpu)],
            "sum": dist.all_reduce_sum(torch.tensor([info.rank + 1.0])).item(),
        }
        for sync_bn in (True, False):
            torch.save(run_components(info, sync_bn), workdir / f"components_sync{int(sync_bn)}_rank{info.rank}.pt")
            torch.save(run_components(info, sync_bn, broadcast_buffers=True),
                       workdir / f"components_sync{int(sync_bn)}_broadcast_rank{info.rank}.pt")
            result[f"components_sync{int(sync_bn)}_s"] = time.perf_counter() - start
        # Each rank runs in its own empty directory with the relative run_dir "run": a file written
        # by rank 1 would land in rank1/run, so "only rank 0 writes" is a directory listing.
        os.chdir(workdir / f"rank{info.rank}")
        from fastbyol.cli import main

        result["rc"] = main(["train", config])
    elif scenario == "train":
        from fastbyol.cli import main

        result["rc"] = main(["train", config])
    elif scenario == "signal":
        def sigterm_on_rank1(step: int) -> None:
            if info.rank == 1 and step == 1:
                os.kill(os.getpid(), signal.SIGTERM)

        try:
            train(load_config(config, world_size=info.world_size), step_hook=sigterm_on_rank1)
            result["interrupted"] = False
        except Interrupted as e:
            result["interrupted"] = str(e)
        result["master"] = os.environ["MASTER_ADDR"]
    result["initialized_after"] = torch.distributed.is_initialized()
    result["worker_s"] = time.perf_counter() - start  # for the curious; never asserted
    (workdir / f"result_rank{info.rank}.json").write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------- helpers of the tests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return env


def torchrun(scenario: str, workdir: Path, config: Path) -> None:
    """Run this file as 2 processes under torchrun; fail with their output if any rank fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           __file__, scenario, str(workdir), str(config)]
    proc = subprocess.run(cmd, env=clean_env(), cwd=workdir, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"


def results(workdir: Path) -> list[dict]:
    return [json.loads((workdir / f"result_rank{r}.json").read_text()) for r in range(2)]


def write_config(path: Path, data_path: Path, **train: object) -> Path:
    """A YAML config of the tiny model on the demo folder, augmentations off (crops only).

    Flip, jitter, gray, blur and solarize draw from generators keyed by rank, so with them on a
    2-rank run and a 1-rank run see different pixels; crops and order are keyed by image index
    and epoch, the same for any world size. With probabilities 0 both runs see the same views.
    """
    off = {"flip_p": 0.0, "jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0,
           "crop_size": 16, "crop_scale": [0.3, 1.0]}
    cfg = {
        "data": {"backend": "folder", "path": str(data_path), "batch_size": 8, "num_workers": 0},
        "augment": {"view1": off, "view2": off},
        "model": {"depth": 18, "stem": "cifar"},
        "byol": {"hidden_dim": 64, "proj_dim": 32, "tau_base": 0.9},
        "optim": {"lr": 0.1, "warmup_epochs": 0.5},
        "train": {"max_steps": RUN_STEPS, "precision": "fp32", "device": "cpu", "run_dir": "run",
                  "checkpoint_every": RUN_CKPT, **train},
        "logging": {"progress": "none", "log_every": 1, "plot": True},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def metrics(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def assert_states_close(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=lambda m: f"{key}: {m}")
        else:
            assert torch.equal(a[key], b[key]), key


def max_change(a: dict, b: dict, prefix: str = "online_") -> float:
    """Largest elementwise difference of the parameters (not BN running statistics) under `prefix`."""
    return max((a[k] - b[k]).abs().max().item() for k in a
               if k.startswith(prefix) and a[k].is_floating_point() and "running_" not in k)


def initial_state(config: Path) -> dict:
    """The model of `config` as train() initialises it."""
    cfg = load_config(config)
    torch.manual_seed(cfg.train.seed)
    return build_model(cfg).state_dict()


def update_difference(a: dict, b: dict, init: dict) -> float:
    """||a - b|| / ||b - init|| over the trained (online) parameters: how far apart two runs
    ended, relative to how far training moved the weights."""
    keys = [k for k in init if k.startswith(("online_", "predictor")) and "running_" not in k
            and init[k].is_floating_point()]
    apart = sum(((a[k] - b[k]) ** 2).sum() for k in keys) ** 0.5
    moved = sum(((b[k] - init[k]) ** 2).sum() for k in keys) ** 0.5
    assert moved > 0.1, moved  # the runs did train
    return (apart / moved).item()


def assert_float32_runs_agree(losses_a: dict, losses_b: dict, state_a: dict, state_b: dict, init: dict) -> None:
    """Two float32 runs of the same config agree as closely as float32 allows.

    Calibration (4 steps of this config, measured): a 1-rank run on 1 vs 2 OpenMP threads ends
    with losses 7.8e-4 apart (relative, step 4) and weights 0.08 of their update apart; a 2-rank run
    vs a 1-rank run (1 thread each) 1.4e-4 and 0.013. The step-1 loss comes before any update and
    is sharp: a wrong shard, a per-rank BatchNorm or another crop shows there. A doubled lr (what
    summed instead of averaged gradients would also do) was measured to move the step-3 loss by
    4% and to leave the weights 1.1 updates apart (the first warm-up step has lr 0).
    """
    steps = sorted(losses_b)
    assert sorted(losses_a) == steps
    assert losses_a[steps[0]] == pytest.approx(losses_b[steps[0]], rel=1e-5)
    assert [losses_a[s] for s in steps] == pytest.approx([losses_b[s] for s in steps], rel=2e-3)
    assert update_difference(state_a, state_b, init) < 0.1


@pytest.fixture
def no_launcher(monkeypatch):
    """This process is a plain single process, whatever launched pytest."""
    for var in list(os.environ):
        if var in LAUNCHER_VARS or var.startswith("SLURM_"):
            monkeypatch.delenv(var)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    from pipelines.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo"), num_classes=4, images_per_class=6, size=24)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, demo) -> Path:
    """One torchrun launch: build_components on fixed halves, then `fastbyol train` to the end."""
    workdir = tmp_path_factory.mktemp("two_ranks")
    for r in range(2):
        (workdir / f"rank{r}").mkdir()
    config = write_config(workdir / "run.yaml", demo)
    torchrun("main", workdir, config)
    return workdir


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, two_ranks) -> Path:
    """The same config as one process (the global batch of 8 on one rank), through the same CLI."""
    from fastbyol.cli import main

    workdir = tmp_path_factory.mktemp("one_rank")
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k in LAUNCHER_VARS or k.startswith("SLURM_")}
    cwd = os.getcwd()
    try:
        os.chdir(workdir)
        assert main(["train", str(two_ranks / "run.yaml"), "train.checkpoint_every=100"]) == 0
    finally:
        os.chdir(cwd)
        os.environ.update(saved)
    return workdir / "run"


# ---------------------------------------------------------------- launcher environment


@pytest.mark.parametrize("nodelist, host", [
    ("gpu[003-005,9]", "gpu003"),
    ("node1,node2", "node1"),
    ("a-b[01-02]", "a-b01"),
    ("gpu[9,003-005],cpu1", "gpu9"),
    ("single", "single"),
    ("rack[2-3]-n[07-08]", "rack2-n07"),
    (" dgx-[12-13] ", "dgx-12"),
])
def test_first_host_of_slurm_node_lists(nodelist, host):
    assert dist.first_host(nodelist) == host


@pytest.mark.parametrize("nodelist", ["", "gpu[003-005", "gpu[]", ","])
def test_first_host_rejects_what_is_not_a_node_list(nodelist):
    with pytest.raises(ValueError, match="SLURM node list"):
        dist.first_host(nodelist)


def test_launcher_env_reads_torchrun():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "4"}  # torchrun inside a SLURM job: torchrun's numbers win
    assert dist.launcher_env(env) == dist.DistInfo(rank=5, world_size=8, local_rank=1)


def test_launcher_env_reads_slurm_and_fills_the_rendezvous():
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "gpu[003-004]"}
    info = dist.launcher_env(env)
    assert info == dist.DistInfo(rank=9, world_size=16, local_rank=1) and not info.is_main and info.enabled
    assert env["MASTER_ADDR"] == "gpu003" and env["MASTER_PORT"] == str(15000 + 123456 % 20000)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("9", "16", "1")
    # a step on part of the job: the step's task count and nodes; a MASTER_ADDR the user set is kept
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "32", "SLURM_STEP_NUM_TASKS": "8", "SLURM_JOB_NODELIST": "n[1-4]",
           "SLURM_STEP_NODELIST": "n[3-4]", "MASTER_ADDR": "10.0.0.7"}
    assert dist.launcher_env(env) == dist.DistInfo(rank=0, world_size=8, local_rank=0)
    assert env["MASTER_ADDR"] == "10.0.0.7" and env["MASTER_PORT"] == str(dist.DEFAULT_PORT)
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_NODELIST": "n[3-4]"}
    dist.launcher_env(env)
    assert env["MASTER_ADDR"] == "n3"


def test_launcher_env_single_process():
    assert dist.launcher_env({}) == dist.DistInfo() and not dist.DistInfo().enabled
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "n1"}  # srun -n 1 / a 1-task job
    assert dist.launcher_env(env) == dist.DistInfo() and "RANK" not in env


@pytest.mark.parametrize("env, match", [
    ({"RANK": "one", "WORLD_SIZE": "2"}, "RANK = 'one'"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "rank 2, world size 2"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, "SLURM_JOB_NODELIST"),
])
def test_launcher_env_rejects_bad_values(env, match):
    with pytest.raises(ValueError, match=match):
        dist.launcher_env(env)


# ---------------------------------------------------------------- single process


def test_sync_batchnorm_conversion_keeps_the_state_and_is_plain_bn_alone():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(4 * 36, 5), torch.nn.BatchNorm1d(5, momentum=None)))
    initial = {k: v.clone() for k, v in net.state_dict().items()}
    baseline = copy.deepcopy(net)
    x = torch.randn(6, 3, 8, 8)
    expected = baseline(x)
    converted = convert_sync_batchnorm(net, torch.device("cpu"))
    assert [type(m).__name__ for m in converted.modules()].count("CPUSyncBatchNorm") == 2
    assert_states_close(converted.state_dict(), initial, 0, 0)  # same keys, same values
    torch.testing.assert_close(converted(x), expected)  # no process group: plain BatchNorm
    assert_states_close(converted.state_dict(), baseline.state_dict(), 1e-6, 1e-7)


def test_an_error_mid_run_leaves_the_process_group(tmp_path, monkeypatch, no_launcher):
    # a real (1-process) gloo group joined by dist.init, as under a launcher
    def init_group(device_name: str, timeout_s: float | None = None):
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        return dist.DistInfo(), torch.device("cpu")

    monkeypatch.setattr(dist, "init", init_group)

    def fail_at_2(step: int) -> None:
        if step == 2:
            raise RuntimeError("boom")

    cfg = load_config(None, [*COMPONENTS, "data.synthetic_steps=4", "train.epochs=1",
                             f"train.run_dir={tmp_path / 'run'}"])
    with pytest.raises(RuntimeError, match="boom"):
        train(cfg, step_hook=fail_at_2)
    assert not torch.distributed.is_initialized()


# ---------------------------------------------------------------- two processes


def test_collectives_agree_on_every_rank(two_ranks):
    for r in results(two_ranks):
        c = r["collectives"]
        assert c["gather_rows"] == torch.arange(10.0).reshape(5, 2).tolist()  # the global table, in order
        assert c["gather_floats"] == [[0.0, 0.5], [1.0, 0.5]]
        assert c["any_rank"] == [True, False]  # a flag on rank 1 only stops both
        assert c["sum"] == 3.0


def test_every_rank_holds_identical_online_and_target_parameters(two_ranks, no_launcher):
    for sync in (1, 0):
        rank0, rank1 = (torch.load(two_ranks / f"components_sync{sync}_rank{r}.pt") for r in range(2))
        init = rank0["init"]
        # the ranks saw different images (their losses differ), yet hold the same weights, bit for bit
        assert rank0["local_losses"][0] != rank1["local_losses"][0]
        for key, value in rank0["state"].items():
            if key.startswith(("online_", "target_", "predictor")) and "running_" not in key:
                assert torch.equal(value, rank1["state"][key]), (sync, key)
        # and the weights did move: the online by LARS, the target by the EMA towards it
        assert max_change(rank0["state"], init, "online_") > 1e-3
        assert max_change(rank0["state"], init, "target_") > 1e-4
        # no buffer broadcast: the BN running statistics agree across ranks exactly when the
        # statistics are global (sync_bn); with per-rank BatchNorm each rank's follow its batches
        differ = [k for k in rank0["state"] if not torch.equal(rank0["state"][k], rank1["state"][k])]
        assert all("running_" in k for k in differ) and bool(differ) == (sync == 0), differ
    rank0 = torch.load(two_ranks / "components_sync1_rank0.pt")
    assert rank0["bn_types"] == ["CPUSyncBatchNorm"]


@pytest.mark.parametrize("sync", [1, 0])
def test_without_the_buffer_broadcast_losses_and_rank0_state_are_those_of_before(two_ranks, no_launcher, sync):
    """DDP's broadcast_buffers=False changes nothing training reads: the losses of every step and
    rank 0's whole state (the checkpoint) equal those of the same run with the broadcast, bit for
    bit; only rank 1's running statistics, never used in train mode, may differ (per-rank BN)."""
    for rank in range(2):
        now, before = (torch.load(two_ranks / f"components_sync{sync}{tag}_rank{rank}.pt")
                       for tag in ("", "_broadcast"))
        assert (now["forward_buffer_sync"], before["forward_buffer_sync"]) == (False, True)
        assert now["losses"] == before["losses"] and now["local_losses"] == before["local_losses"]
        differ = [k for k in now["state"] if not torch.equal(now["state"][k], before["state"][k])]
        if rank == 0 or sync:
            assert differ == [], differ
        else:  # the broadcast had overwritten rank 1's statistics with rank 0's before each forward
            assert differ and all("running_" in k for k in differ), differ


def test_two_ranks_of_b_match_one_rank_of_2b_with_sync_bn(two_ranks, no_launcher):
    single = run_components(dist.DistInfo(), sync_bn=True)
    synced = torch.load(two_ranks / "components_sync1_rank0.pt")
    assert single["bn_types"] == ["BatchNorm1d", "BatchNorm2d"]  # the truth: plain BN over all 2B images
    assert synced["losses"] == pytest.approx(single["losses"], rel=1e-10)
    assert_states_close(synced["state"], single["state"], rtol=1e-9, atol=1e-10)
    # without global statistics the same comparison fails: the test can tell
    local = torch.load(two_ranks / "components_sync0_rank0.pt")
    assert max(abs(a - b) for a, b in zip(local["losses"], single["losses"])) > 1e-3
    assert max_change(local["state"], single["state"]) > 1e-3


def test_cli_on_two_ranks_matches_one_rank_end_to_end(two_ranks, one_rank, no_launcher):
    # The real loop in float32: folder loader sharded by rank, lr of the global batch, BatchNorm
    # converted by train(), loss all-reduced for the metrics, checkpoint from rank 0. float32
    # rounding differs with the reduction order (even a 1-rank run on 1 vs 2 threads differs), so
    # the tolerance is loose but 100x below how far the weights moved; a wrong shard or a
    # per-rank BatchNorm is caught by the step-1 loss already.
    run2 = two_ranks / "rank0" / "run"
    losses2, losses1 = metrics(run2), metrics(one_rank)
    assert sorted(losses2) == list(range(1, RUN_STEPS + 1))
    state2, state1 = checkpoint.load_latest(run2), checkpoint.load_latest(one_rank)
    assert state2["step"] == state1["step"] == RUN_STEPS and state2["world_size"] == 2
    assert_float32_runs_agree(losses2, losses1, state2["model"], state1["model"], initial_state(two_ranks / "run.yaml"))


def test_only_rank0_writes_files(two_ranks):
    assert [r["rc"] for r in results(two_ranks)] == [0, 0]
    assert list((two_ranks / "rank1").iterdir()) == []
    written = {p.name for p in (two_ranks / "rank0" / "run").iterdir()}
    assert written == {".lock", "config.yaml", "metrics.jsonl", "metrics.png", "encoder.pt", "views.png",
                       f"checkpoint_{RUN_CKPT:09d}.pt", f"checkpoint_{RUN_STEPS:09d}.pt"}
    # one line per step: no second writer appended to metrics.jsonl
    assert len((two_ranks / "rank0" / "run" / "metrics.jsonl").read_text().splitlines()) == RUN_STEPS


def test_the_process_group_is_left_after_a_run(two_ranks):
    assert [r["initialized_after"] for r in results(two_ranks)] == [False, False]


def test_resume_a_two_rank_checkpoint_on_one_rank(two_ranks, one_rank, tmp_path, monkeypatch, no_launcher):
    from fastbyol.cli import main

    run = tmp_path / "run"
    shutil.copytree(two_ranks / "rank0" / "run", run)
    for name in (f"checkpoint_{RUN_STEPS:09d}.pt", "encoder.pt", "metrics.png"):
        (run / name).unlink()
    lines = (run / "metrics.jsonl").read_text().splitlines()[:RUN_CKPT]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert checkpoint.load_latest(run)["world_size"] == 2
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(two_ranks / "run.yaml")]) == 0
    resumed = checkpoint.load_latest(run)
    assert resumed["step"] == RUN_STEPS and resumed["world_size"] == 1
    # mid-epoch (step 2 of 3 per epoch), another world size: the same run as without the stop
    init = initial_state(two_ranks / "run.yaml")
    for other in (one_rank, two_ranks / "rank0" / "run"):
        assert_float32_runs_agree(metrics(run), metrics(other), resumed["model"],
                                  checkpoint.load_latest(other)["model"], init)


def srun(scenario: str, workdir: Path, config: Path) -> None:
    """Start this file twice as `srun --ntasks 2` would: SLURM_* variables only, no RANK / WORLD_SIZE,
    no MASTER_ADDR (dist.py takes the first host of the node list)."""
    procs, port = [], free_port()
    for rank in range(2):
        env = {**clean_env(), "SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
               "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "4242", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, __file__, scenario, str(workdir), str(config)], env=env,
                                      cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=TIMEOUT_S)[0][-6000:] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)


def test_sigterm_on_one_srun_task_stops_every_rank_at_the_same_step(tmp_path, demo):
    # As SLURM's `#SBATCH --signal=TERM@120` would: rank 1 alone gets SIGTERM after step 1; the
    # ranks agree at the next log step (2), rank 0 writes the checkpoint, both leave the group.
    config = write_config(tmp_path / "run.yaml", demo, run_dir=str(tmp_path / "run"), checkpoint_every=100)
    text = yaml.safe_load(config.read_text())
    text["logging"].update(log_every=2, plot=False)
    text["dist"] = {"sync_bn": False}  # not what this test is about; saves a few seconds
    config.write_text(yaml.safe_dump(text))
    srun("signal", tmp_path, config)
    ranks = results(tmp_path)
    assert [(r["rank"], r["world_size"], r["master"]) for r in ranks] == [(0, 2, "localhost"), (1, 2, "localhost")]
    assert [r["interrupted"] for r in ranks] == ["interrupted at step 2"] * 2
    assert [r["initialized_after"] for r in ranks] == [False, False]
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "run")] == ["checkpoint_000000002.pt"]
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [2]


def test_a_last_step_of_one_image_per_rank_does_not_end_a_two_rank_run(tmp_path):
    # 26 images, global batch 8 on 2 ranks, drop_last false: the 4th step holds 2 images, 1 per rank,
    # and a per-rank BatchNorm (dist.sync_bn false) cannot train on one
    from pipelines.demo import make_demo_dataset

    data = make_demo_dataset(tmp_path / "demo", num_classes=2, images_per_class=13, size=24)
    config = write_config(tmp_path / "run.yaml", data, run_dir=str(tmp_path / "run"), checkpoint_every=100)
    text = yaml.safe_load(config.read_text())
    text["data"]["drop_last"] = False
    text["dist"] = {"sync_bn": False}
    text["logging"]["plot"] = False
    config.write_text(yaml.safe_dump(text))
    torchrun("train", tmp_path, config)
    assert [r["rc"] for r in results(tmp_path)] == [0, 0]
    assert sorted(metrics(tmp_path / "run")) == [1, 2, 3, 4]


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
