"""BatchNorm over the global batch (the paper's statistics) on every device.

On GPUs torch's nn.SyncBatchNorm. Its kernels (batch_norm_stats,
batch_norm_gather_stats_with_counts, ...) have no CPU implementation in torch (2.13), so on CPUs
`CPUSyncBatchNorm` computes the same statistics with one all-reduce (fastbyol.dist); it is what
makes a 2-process gloo run equal to a 1-process run on the concatenated batch.

Both take a process group: statistics over the ranks of a group (dist.sync_bn_group_size, e.g.
one node) instead of all ranks, when the per-GPU batch is so small that global SyncBN's
latency-bound collectives dominate the step (docs/scaling.md).
"""

from __future__ import annotations

import torch
from torch import nn

from fastbyol import dist


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) over a group whose backward is all_reduce(SUM) of the incoming gradient.

    Every rank's loss depends on every rank's input through the shared statistics, so the
    gradient reaching this rank's input is d(sum over ranks of L_r)/dx, as in torch's SyncBatchNorm;
    DDP's division by the world size then gives the gradient of the global-batch mean loss.
    """

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, group: object) -> torch.Tensor:
        ctx.group = group
        return dist.all_reduce_sum(x, group)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return dist.all_reduce_sum(grad.contiguous(), ctx.group), None


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with statistics over the batches of all ranks (or of `process_group`'s), for CPU tensors (gloo).

    Same state_dict as nn.BatchNorm{1,2,3}d (checkpoints load either way). In training mode with
    world > 1: mean and biased var over every rank's (N, *spatial) positions, from one all-reduce
    of (sum x, sum x^2, count) accumulated in float64 (so E[x^2] - mean^2 does not cancel, and one
    collective per layer instead of two); running_var takes the unbiased n / (n - 1) variance, as
    nn.BatchNorm does. The normalization runs in the input's dtype (float32 for half inputs).
    Otherwise (eval mode, one process, a group of one) it is plain BatchNorm.
    """

    process_group = None  # torch.distributed group of the statistics; None: all ranks (set by convert_sync_batchnorm)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"CPUSyncBatchNorm: expected an input of at least 2 dims (N, C, ...), got {input.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.group_size(self.process_group) > 1):
            return super().forward(x)
        self._check_input_dim(x)
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        shape = [1, channels] + [1] * (x.dim() - 2)
        x64 = x.double()
        count = torch.full((1,), x.numel() // channels, dtype=torch.float64, device=x.device)
        sums = _SumOverRanks.apply(torch.cat([x64.sum(dims), x64.square().sum(dims), count]), self.process_group)
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


def _to_cpu_sync(module: nn.Module, process_group: object) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CPUSyncBatchNorm):
        out = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        out.process_group = process_group
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        if module.track_running_stats:
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _to_cpu_sync(child, process_group))
    return out


def convert_sync_batchnorm(module: nn.Module, device: torch.device, process_group: object = None) -> nn.Module:
    """Every BatchNorm of `module` -> one whose statistics span the batches of `process_group`'s
    ranks (None: all ranks; see fastbyol.dist.rank_groups).

    CUDA: torch's nn.SyncBatchNorm (NCCL). Elsewhere: CPUSyncBatchNorm (all-reduce over gloo).
    Parameters and buffers are kept (the same tensors); state_dict keys do not change.
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    return _to_cpu_sync(module, process_group)


__all__ = ["CPUSyncBatchNorm", "convert_sync_batchnorm"]
