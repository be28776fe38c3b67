"""torch.distributed from the launcher's environment: torchrun, SLURM's srun, or a single process.

One process per GPU. torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
srun sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / SLURM_JOB_NODELIST, from which the
rendezvous address is the first host of the node list. NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"SLURM_JOB_NODELIST = {nodelist!r}: cannot read a host name from it")
    prefix, ranges = m.group(1), m.group(3)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def launcher_env(environ: dict[str, str] | None = None) -> DistInfo:
    """Rank, world size and local rank from torchrun's or SLURM's variables (single process if neither).

    Under SLURM, MASTER_ADDR / MASTER_PORT are filled in (first host of the node list, port 29500
    unless set) so that init_process_group's env:// rendezvous works without a wrapper script.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        info = DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
        env.setdefault("MASTER_ADDR", first_host(env.get("SLURM_JOB_NODELIST", "localhost")))
        env.setdefault("MASTER_PORT", "29500")
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(info.rank), str(info.world_size), str(info.local_rank)
        return info
    return DistInfo()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' | 'cuda' | 'cpu' -> the device of this process (cuda:LOCAL_RANK on GPUs)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device = cuda but no CUDA device is available (use train.device=cpu)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init(device_name: str = "auto") -> tuple[DistInfo, torch.device]:
    """Read the launcher, pick this process's device, and join the process group if world > 1."""
    info = launcher_env()
    device = resolve_device(device_name, info.local_rank)
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=info.rank, world_size=info.world_size,
                                device_id=device if device.type == "cuda" else None)
    return info, device


def shutdown() -> None:
    """Leave the process group (on success, error or signal) so no rank hangs in NCCL teardown."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (identity in a single process). For metrics only."""
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank `src`'s Python object on every rank (identity in a single process)."""
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
