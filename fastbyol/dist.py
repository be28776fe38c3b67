"""torch.distributed from the launcher's environment: torchrun, SLURM's srun, or a single process.

One process per GPU. torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
srun sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / SLURM_JOB_NODELIST, from which the
rendezvous address is the first host of the node list. NCCL on GPUs, gloo on CPUs.

BatchNorm over the global batch (the paper's statistics): torch's SyncBatchNorm on GPUs. Its
kernels (batch_norm_stats, batch_norm_gather_stats_with_counts, ...) have no CPU implementation
in torch (2.13), so on CPUs `CPUSyncBatchNorm` computes the same statistics with one all-reduce; it is
what makes a 2-process gloo run equal to a 1-process run on the concatenated batch.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import MutableMapping

import torch
import torch.distributed as dist
from torch import nn

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


# ---------------------------------------------------------------- collectives for metrics and control


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


# ---------------------------------------------------------------- BatchNorm over the global batch


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) whose backward is all_reduce(SUM) of the incoming gradient.

    Every rank's loss depends on every rank's input through the shared statistics, so the
    gradient reaching this rank's input is d(sum over ranks of L_r)/dx, as in torch's SyncBatchNorm;
    DDP's division by the world size then gives the gradient of the global-batch mean loss.
    """

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with statistics over all ranks' batches, for CPU tensors (gloo).

    Same state_dict as nn.BatchNorm{1,2,3}d (checkpoints load either way). In training mode with
    world > 1: mean and biased var over every rank's (N, *spatial) positions, from one all-reduce
    of (sum x, sum x^2, count) accumulated in float64 (so E[x^2] - mean^2 does not cancel, and one
    collective per layer instead of two); running_var takes the unbiased n / (n - 1) variance, as
    nn.BatchNorm does. The normalization runs in the input's dtype (float32 for half inputs).
    Otherwise (eval mode, one process) it is plain BatchNorm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"CPUSyncBatchNorm: expected an input of at least 2 dims (N, C, ...), got {input.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _world() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, channels] + [1] * (x.dim() - 2)
        x64 = x.double()
        count = torch.full((1,), x.numel() // channels, dtype=torch.float64, device=x.device)
        sums = _SumOverRanks.apply(torch.cat([x64.sum(dims), x64.square().sum(dims), count]))
        n = sums[2 * channels]
        mean = sums[:channels] / n
        var = (sums[channels:2 * channels] / n - mean.square()).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        y = (x.to(compute) - mean.to(compute).view(shape)) * torch.rsqrt(var + self.eps).to(compute).view(shape)
        if self.affine:
            y = y * self.weight.to(compute).view(shape) + self.bias.to(compute).view(shape)
        return y.to(x.dtype)


def _to_cpu_sync(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CPUSyncBatchNorm):
        out = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _to_cpu_sync(child))
    return out


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of `module` -> one whose statistics span all ranks' batches.

    CUDA: torch's nn.SyncBatchNorm (NCCL). Elsewhere: CPUSyncBatchNorm (all-reduce over gloo).
    Parameters and buffers are kept (the same tensors); state_dict keys do not change.
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _to_cpu_sync(module)


__all__ = ["CPUSyncBatchNorm", "DistInfo", "all_gather_object", "all_reduce_mean", "barrier", "broadcast_object",
           "convert_sync_batchnorm", "first_host", "init", "launcher_env", "resolve_device", "shutdown"]
