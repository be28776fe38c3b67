"""torch.distributed from the launcher's environment: torchrun, SLURM's srun, or a single process.

One process per GPU. torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
srun sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / SLURM_JOB_NODELIST, from which the
rendezvous address is the first host of the node list. NCCL on GPUs, gloo on CPUs.

Every collective of fastbyol goes through this module (metrics, the stop flag, the kNN feature
gather, the profiler's per-rank figures, the all-reduce of models/sync_batchnorm.py); each is
the identity in a single process.
"""

from __future__ import annotations

import datetime
import os
import re
import time
from dataclasses import dataclass
import math
from typing import MutableMapping

import torch
import torch.distributed as dist
import torch.nn.functional as F

DEFAULT_PORT = 29500


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


# ---------------------------------------------------------------- launcher environment


def _split_top_level(nodelist: str) -> list[str]:
    """'a[1-2,5],b' -> ['a[1-2,5]', 'b']: commas inside brackets do not separate hosts."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(nodelist[start:i])
            start = i + 1
    parts.append(nodelist[start:])
    return [p.strip() for p in parts if p.strip()]


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (what `scontrol show hostnames | head -1` prints).

    'gpu[003-005,9],cpu1' -> 'gpu003'; 'node1,node2' -> 'node1'; 'a-b[01-02]' -> 'a-b01';
    'rack[1-2]-n[07-08]' -> 'rack1-n07' (every bracket contributes its first value, zero padding kept).
    """
    entries = _split_top_level(nodelist or "")
    if not entries or nodelist.count("[") != nodelist.count("]"):
        raise ValueError(f"SLURM node list {nodelist!r}: cannot read a host name from it "
                         "(expected e.g. 'gpu[003-005,9]' or 'node1,node2')")

    def first_of(match: re.Match) -> str:
        value = match.group(1).split(",")[0].split("-")[0].strip()
        if not value:
            raise ValueError(f"SLURM node list {nodelist!r}: empty range in {match.group(0)!r}")
        return value

    return re.sub(r"\[([^\]]*)\]", first_of, entries[0])


def _int_var(env: MutableMapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None:
        if default is None:
            raise ValueError(f"environment variable {name} is not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} = {raw!r}: expected an integer") from None


def launcher_env(environ: MutableMapping[str, str] | None = None) -> DistInfo:
    """Rank, world size and local rank from torchrun's or SLURM's variables (single process if neither).

    torchrun (RANK and WORLD_SIZE set) wins over SLURM, so torchrun started inside a SLURM job
    (one task per node) works. Under srun alone, the step's variables are read (SLURM_STEP_NUM_TASKS,
    SLURM_STEP_NODELIST; the job's when absent) and RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
    MASTER_PORT are written into `environ` (os.environ by default) so that init_process_group's
    env:// rendezvous works without a wrapper script: MASTER_ADDR = the first host of the node
    list, MASTER_PORT = 15000 + SLURM_JOB_ID % 20000 (two jobs sharing a node do not collide);
    values already set are kept.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        info = DistInfo(_int_var(env, "RANK"), _int_var(env, "WORLD_SIZE"), _int_var(env, "LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env:
        world = _int_var(env, "SLURM_STEP_NUM_TASKS", _int_var(env, "SLURM_NTASKS", 1))
        if world <= 1:
            return DistInfo()
        info = DistInfo(_int_var(env, "SLURM_PROCID"), world, _int_var(env, "SLURM_LOCALID", 0))
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodes:
            raise ValueError("SLURM_PROCID is set but none of SLURM_STEP_NODELIST / SLURM_JOB_NODELIST / "
                             "SLURM_NODELIST is: cannot find the rendezvous host (set MASTER_ADDR)")
        env.setdefault("MASTER_ADDR", first_host(nodes))
        job = env.get("SLURM_JOB_ID", "")
        env.setdefault("MASTER_PORT", str(15000 + int(job) % 20000 if job.isdigit() else DEFAULT_PORT))
        env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(info.rank), str(info.world_size), str(info.local_rank)
    else:
        return DistInfo()
    if not 0 <= info.rank < info.world_size or info.local_rank < 0:
        raise ValueError(f"launcher gave rank {info.rank}, world size {info.world_size}, local rank "
                         f"{info.local_rank}: expected 0 <= rank < world size and local rank >= 0")
    return info


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' | 'cuda' | 'cpu' -> the device of this process (cuda:LOCAL_RANK on GPUs).

    When the scheduler already gave each process a single GPU (CUDA_VISIBLE_DEVICES of one device,
    e.g. srun --gpus-per-task=1), that GPU is cuda:0 whatever the local rank.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device = cuda but no CUDA device is available (use train.device=cpu)")
        count = torch.cuda.device_count()
        index = 0 if count == 1 else local_rank
        if index >= count:
            raise RuntimeError(f"LOCAL_RANK = {local_rank} but this process sees {count} GPUs "
                               f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): "
                               "start one process per GPU")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def init(device_name: str = "auto", timeout_s: float | None = None) -> tuple[DistInfo, torch.device]:
    """Read the launcher, pick this process's device, and join the process group if world > 1.
    `timeout_s`: how long a collective waits for every rank before it fails (torch's default if None)."""
    info = launcher_env()
    device = resolve_device(device_name, info.local_rank)
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        dist.init_process_group(backend, rank=info.rank, world_size=info.world_size,
                                device_id=device if device.type == "cuda" else None, **timeout)
    return info, device


class RankLost(RuntimeError):
    """A collective failed because another rank died or stopped answering; the message names it."""


def is_collective_failure(e: BaseException) -> bool:
    """Whether `e` is a collective that failed for want of a peer (gloo: connection reset or closed,
    timeout; NCCL: DistBackendError), not an error of this rank's own computation."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and "gloo" in str(e))


def lost_ranks(grace_s: float) -> list[int]:
    """After a failed collective: the ranks that do not check in within `grace_s` seconds.

    Every rank that is still alive sees the failure and checks in through the rendezvous store;
    the others are the lost ones. If the store itself is gone, so is the rank hosting it (rank 0,
    unless torchrun's agent hosts it).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    store = dist.distributed_c10d._get_default_store()
    try:
        store.set(f"fastbyol/alive/{rank}", "1")
    except Exception:  # noqa: BLE001 - any store failure means its host is gone
        return [0]
    lost, deadline = [], time.monotonic() + grace_s
    for other in range(world):
        if other == rank:
            continue
        try:
            store.wait([f"fastbyol/alive/{other}"], datetime.timedelta(seconds=max(0.1, deadline - time.monotonic())))
        except Exception:  # noqa: BLE001 - timed out (the rank is gone) or the store is gone
            lost.append(other)
    return lost


def name_lost_ranks(e: BaseException, grace_s: float, where: str) -> RankLost:
    """The one-line error of a failed collective: which ranks were lost, and what still holds."""
    rank, world = dist.get_rank(), dist.get_world_size()
    lost = lost_ranks(grace_s)
    who = f"rank(s) {', '.join(map(str, lost))} of {world}" if lost else "another rank"
    first = " ".join(str(e).split())[:200]
    return RankLost(f"rank {rank}: lost {who} in a collective ({first}); {where}")


def shutdown() -> None:
    """Leave the process group (on success, error or signal) so no rank hangs in NCCL teardown."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- collectives for metrics and control


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (identity in a single process). For metrics only."""
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialized process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _where(device: torch.device) -> torch.device:
    """Where a collective's tensor lives: on the GPU for NCCL, on the CPU for gloo."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(t: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum over the ranks of `group` (None: all ranks), into a new tensor (a copy in a single process)."""
    t = t.clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def group_size(group: dist.ProcessGroup | None = None) -> int:
    """Ranks in `group` (None: the world); 1 without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


def rank_groups(size: int) -> dist.ProcessGroup | None:
    """This rank's group among consecutive groups of `size` ranks: [0, size), [size, 2 size), ...

    None (every rank, the default group) when `size` is 0 or the world size, or without a process
    group. torch.distributed.new_group is itself a collective: every rank creates every group, in the
    same order, so every rank must call this with the same `size`. Consecutive ranks share a node
    under torchrun and srun, so a group of 8 on 8-GPU nodes keeps its collectives on NVLink.
    """
    rank, world = rank_and_world()
    if size in (0, world) or world == 1:
        return None
    if size < 0 or world % size:
        raise ValueError(f"a group of {size} ranks does not divide the {world} ranks evenly")
    mine = None
    for start in range(0, world, size):
        group = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            mine = group
    return mine


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on at least one (e.g. a signal reached one rank)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_where(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """All ranks' rows of an (n, D) table in global order, where rank r holds rows r, r+world, ...

    `local` is this rank's (ceil((n - r) / world), D) share on the collective's device.
    """
    rank, world = rank_and_world()
    if world == 1:
        return local
    per = math.ceil(n / world)
    local = F.pad(local, (0, 0, 0, per - local.shape[0]))
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local)
    # (per, world, D): element [i, r] is global row i*world + r; the padding lands at rows >= n
    return torch.stack(parts, dim=1).reshape(per * world, -1)[:n]


def gather_floats(values: list[float], device: torch.device) -> list[list[float]]:
    """`values` of every rank, in rank order; [values] in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return [values]
    mine = torch.tensor(values, dtype=torch.float64, device=_where(device))
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [t.tolist() for t in every]


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank `src`'s Python object on every rank (identity in a single process): one rank decides."""
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def all_gather_object(obj: object) -> list:
    """Every rank's Python object, in rank order (a one-element list in a single process)."""
    if dist.is_available() and dist.is_initialized():
        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


__all__ = ["DistInfo", "RankLost", "all_gather_object", "all_reduce_mean", "all_reduce_sum", "any_rank", "barrier",
           "broadcast_object", "first_host", "gather_floats", "gather_rows", "group_size", "init", "is_collective_failure", "launcher_env", "lost_ranks", "name_lost_ranks", "rank_and_world", "rank_groups", "resolve_device", "shutdown"]
