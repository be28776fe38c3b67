"""Distributed faults with 2 gloo ranks on CPU (issue 15, section 4): a rank killed mid-run, and
storage that is not shared. The ranks are started as `srun --ntasks 2` would (SLURM_* variables,
no torchrun agent that would kill the survivor for us), each in its own working directory with
the relative run_dir "run", so each rank has its own storage. This file is also the worker.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # when run as a worker
    sys.path.insert(0, str(ROOT))

from fastbyol import checkpoint  # noqa: E402

TIMEOUT_S = 240


def _worker(argv: list[str]) -> int:
    """`python test_dist_faults.py CONFIG KILL_RANK1_AT_STEP`: `fastbyol train CONFIG` on this rank
    (SIGKILL rank 1 after that step; 0 = never), its exit code and stderr kept in result.json."""
    from fastbyol import cli, train

    config, kill_at = argv[0], int(argv[1])
    torch.set_num_threads(1)
    real_train = train.train

    def train_and_kill(cfg, force=False, step_hook=None):
        def hook(step: int) -> None:
            if os.environ["SLURM_PROCID"] == "1" and step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        return real_train(cfg, force=force, step_hook=hook)

    train.train = train_and_kill
    start = time.monotonic()
    rc = cli.main(["train", config])
    Path("result.json").write_text(json.dumps({"rc": rc, "seconds": time.monotonic() - start}))
    return rc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(workdir: Path, config: Path, kill_at: int = 0) -> list[tuple[int, str]]:
    """Both ranks of `config`, rank r in workdir/rank<r>; their (exit code, output)."""
    port, procs = free_port(), []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_JOB_NODELIST="localhost",
                   SLURM_JOB_ID="4242", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        cwd = workdir / f"rank{rank}"
        cwd.mkdir(exist_ok=True)
        procs.append(subprocess.Popen([sys.executable, __file__, str(config), str(kill_at)], env=env, cwd=cwd,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return [(p.wait(timeout=TIMEOUT_S), p.communicate()[0]) for p in procs]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    from pipelines.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo"), num_classes=4, images_per_class=6, size=24)


def write_config(path: Path, demo: Path, **train: object) -> Path:
    cfg = {
        "data": {"backend": "folder", "path": str(demo), "batch_size": 8, "num_workers": 0},
        "augment": {"view1": {"crop_size": 16}, "view2": {"crop_size": 16}},
        "model": {"depth": 18, "stem": "cifar"},
        "byol": {"hidden_dim": 64, "proj_dim": 32},
        "train": {"max_steps": 6, "precision": "fp32", "device": "cpu", "run_dir": "run", "checkpoint_every": 2,
                  **train},
        "logging": {"progress": "plain", "log_every": 1, "plot": False},
        "dist": {"sync_bn": False, "timeout_s": 30},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_killed_rank_is_named_and_the_other_exits_with_a_whole_checkpoint(tmp_path, demo):
    config = write_config(tmp_path / "run.yaml", demo)
    (rc0, out0), (rc1, _) = two_ranks(tmp_path, config, kill_at=3)
    assert rc1 == -signal.SIGKILL
    assert rc0 == 1, out0[-3000:]
    error = [line for line in out0.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "rank 0: lost rank(s) 1 of 2 in a collective" in error[0], out0[-3000:]
    assert "Traceback" not in out0
    # bounded by dist.timeout_s (30 s here; a peer's death is seen at once) plus the 10 s check-in
    assert json.loads((tmp_path / "rank0" / "result.json").read_text())["seconds"] < 30 + 10 + 30
    state = checkpoint.load_latest(tmp_path / "rank0" / "run")
    assert state["step"] == 2 and checkpoint.list_checkpoints(tmp_path / "rank0" / "run")[-1].name.endswith("2.pt")


def test_every_rank_loads_rank0s_checkpoint_or_all_fail_naming_the_rank(tmp_path, demo):
    from fastbyol.config import load_config
    from fastbyol.train import train

    config = write_config(tmp_path / "run.yaml", demo, max_steps=4)
    (tmp_path / "rank0").mkdir()
    cwd = os.getcwd()
    try:  # the first 4 steps as one process, into rank 0's storage only
        os.chdir(tmp_path / "rank0")
        train(load_config(config))
    finally:
        os.chdir(cwd)
    config = write_config(tmp_path / "run.yaml", demo, max_steps=6)
    # rank 1's storage lacks rank 0's newest checkpoint: both ranks stop, naming rank 1 and the file
    results = two_ranks(tmp_path, config)
    assert [rc for rc, _ in results] == [2, 2], results[0][1][-3000:]
    for rc, out in results:
        assert "rank 1: " in out and "rank1/run/checkpoint_000000004.pt does not exist, but rank 0 resumes from it" in out
    # rank 1 holds that checkpoint and a newer one of its own: rank 0's choice (step 4) is what both load
    (tmp_path / "rank1" / "run").mkdir()
    ours = checkpoint.load_latest(tmp_path / "rank0" / "run")
    torch.save({k: v for k, v in ours.items() if k != "path"}, tmp_path / "rank1" / "run" / "checkpoint_000000004.pt")
    torch.save({**ours, "step": 5}, tmp_path / "rank1" / "run" / "checkpoint_000000005.pt")
    results = two_ranks(tmp_path, config)
    assert [rc for rc, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert "resumed from" in results[0][1] and "at step 4" in results[0][1]
    assert [json.loads(line)["step"] for line in (tmp_path / "rank0" / "run" / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2, 3, 4, 5, 6]


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
