"""LARS as in the official BYOL code, as multi-tensor (foreach) kernels, the lr / tau schedules,
and the run plan that fixes them for one run.

The update (deepmind-research byol/utils/optimizers.py), per parameter w with gradient g:

    u   = g + wd * w
    u   = u * eta * ||w|| / ||u||      (not for lars_exclude groups; factor 1 if ||w|| or ||u|| is 0)
    buf = momentum * buf + u
    w   = w - lr * buf                 (lr scales the buffer, so a new lr acts at once)

Biases and BatchNorm parameters go in a group with lars_exclude=True and weight_decay=0
(fastbyol.byol.param_groups builds those groups).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch

if TYPE_CHECKING:
    from fastbyol.config import Config

__all__ = ["LARS", "RunPlan", "lr_at", "tau_at"]


class LARS(torch.optim.Optimizer):
    """Layer-wise Adaptive Rate Scaling with momentum, BYOL's variant (see the module docstring).

    Args:
        params: parameters or param-group dicts; every option below may be set per group.
        lr: learning rate (>= 0), multiplies the momentum buffer.
        momentum: in [0, 1).
        weight_decay: >= 0, added to the gradient before the trust ratio.
        eta: trust coefficient (> 0).
        lars_exclude: True skips the trust ratio for the group (biases, BatchNorm).
        foreach: True (default) updates all parameters of a group with torch._foreach_* ops and
            no host-device synchronisation; False is a plain per-parameter loop, kept as the
            reference the benchmark compares against.

    Momentum buffers live in ``self.state[p]["momentum_buffer"]`` (starting from zeros, as optax's
    trace), so ``state_dict()`` / ``load_state_dict()`` resume exactly.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 1e-3,
        lars_exclude: bool = False,
        foreach: bool = True,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_exclude=lars_exclude)
        _check_options(defaults, where="LARS")
        self.foreach = bool(foreach)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        index = len(self.param_groups)
        super().add_param_group(param_group)  # fills in the defaults
        _check_options(self.param_groups[-1], where=f"LARS param group {index}")
        for p in self.param_groups[-1]["params"]:
            if not p.is_floating_point():
                raise ValueError(f"LARS param group {index}: parameter of dtype {p.dtype}, expected floating point")

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One update of every parameter whose .grad is not None (others are left untouched)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if not params:
                continue
            if self.foreach:
                # _foreach_norm returns one 0-d tensor per input; stacking them needs one device/dtype
                by_kind: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
                for p in params:
                    by_kind[(p.device, p.dtype)].append(p)
                for same_kind in by_kind.values():
                    self._step_foreach(group, same_kind)
            else:
                self._step_loop(group, params)
        return loss

    def _step_foreach(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        grads = [p.grad for p in params]
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        # u = g + wd * w in new tensors: p.grad stays as backward produced it (DDP buckets, logging)
        updates = torch._foreach_add(grads, params, alpha=group["weight_decay"]) if group["weight_decay"] else grads
        torch._foreach_mul_(bufs, group["momentum"])
        if group["lars_exclude"]:
            torch._foreach_add_(bufs, updates)
        else:
            n = len(params)
            norms = torch.stack(torch._foreach_norm([*params, *updates]))  # ||w|| then ||u||, one launch
            w_norm, u_norm = norms[:n], norms[n:]
            # One op over all layers; the division's inf/nan where a norm is 0 is discarded by where.
            ratio = torch.where((w_norm > 0) & (u_norm > 0), group["eta"] * w_norm / u_norm, torch.ones_like(w_norm))
            # buf += ratio_i * u_i with the 0-d ratios as addcmul's tensor1: CUDA runs that as one
            # multi-tensor kernel (its 0-d tensor1 route, pytorch PR 172731), where _foreach_mul_(u,
            # 0-d list) fails the same-shape check and launches one kernel per tensor (so does addcmul
            # on a torch older than that route). No host sync either way.
            torch._foreach_addcmul_(bufs, list(ratio.unbind()), updates)
        torch._foreach_add_(params, bufs, alpha=-group["lr"])

    def _step_loop(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        for p in params:
            u = p.grad + group["weight_decay"] * p
            if not group["lars_exclude"]:
                w_norm, u_norm = p.norm(), u.norm()
                u = u * torch.where((w_norm > 0) & (u_norm > 0), group["eta"] * w_norm / u_norm, 1.0)
            buf = self.state[p]["momentum_buffer"]
            buf.mul_(group["momentum"]).add_(u)
            p.add_(buf, alpha=-group["lr"])


def _check_options(options: dict[str, Any], where: str) -> None:
    lr, momentum, wd, eta = options["lr"], options["momentum"], options["weight_decay"], options["eta"]
    if not isinstance(lr, (int, float)) or not lr >= 0:
        raise ValueError(f"{where}: lr = {lr!r}, expected a number >= 0")
    if not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
        raise ValueError(f"{where}: momentum = {momentum!r}, expected a number in [0, 1)")
    if not isinstance(wd, (int, float)) or not wd >= 0:
        raise ValueError(f"{where}: weight_decay = {wd!r}, expected a number >= 0")
    if not isinstance(eta, (int, float)) or not eta > 0:
        raise ValueError(f"{where}: eta = {eta!r}, expected a number > 0")
    if not isinstance(options["lars_exclude"], bool):
        raise ValueError(f"{where}: lars_exclude = {options['lars_exclude']!r}, expected True or False")


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Learning rate at optimizer step `step` (0-based): linear warm-up, then cosine to 0.

    Warm-up is ``peak_lr * step / warmup_steps`` for step < warmup_steps, as in the official code
    (byol/utils/schedules.py, learning_schedule): step 0 runs at lr 0 (its momentum still counts)
    and the peak is reached exactly at step == warmup_steps, where the cosine starts:
    ``peak_lr * (1 + cos(pi * (step - warmup_steps) / (total_steps - warmup_steps))) / 2``, which
    is 0 at total_steps. Steps past total_steps stay at 0 (the official code clips the same way).
    `peak_lr` is the already batch-scaled value (0.2 * batch / 256 in the paper).
    """
    if total_steps < 1:
        raise ValueError(f"lr_at: total_steps = {total_steps}, expected >= 1")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"lr_at: warmup_steps = {warmup_steps}, expected 0 <= warmup_steps < total_steps = {total_steps}")
    if not peak_lr >= 0:
        raise ValueError(f"lr_at: peak_lr = {peak_lr!r}, expected >= 0")
    if step < 0:
        raise ValueError(f"lr_at: step = {step}, expected >= 0")
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = min(step - warmup_steps, total_steps - warmup_steps) / (total_steps - warmup_steps)
    return peak_lr * (1.0 + math.cos(math.pi * progress)) / 2.0


def tau_at(step: int, total_steps: int, tau_base: float) -> float:
    """Target EMA rate tau at step `step`: ``1 - (1 - tau_base) * (cos(pi * step / total_steps) + 1) / 2``.

    tau_base at step 0, rising monotonically to 1.0 at total_steps; later steps stay at 1.0 (clipped,
    as the official code does).
    """
    if total_steps < 1:
        raise ValueError(f"tau_at: total_steps = {total_steps}, expected >= 1")
    if not 0 <= tau_base <= 1:
        raise ValueError(f"tau_at: tau_base = {tau_base!r}, expected a number in [0, 1]")
    if step < 0:
        raise ValueError(f"tau_at: step = {step}, expected >= 0")
    progress = min(step, total_steps) / total_steps
    return 1.0 - (1.0 - tau_base) * (math.cos(math.pi * progress) + 1.0) / 2.0


@dataclass(frozen=True)
class RunPlan:
    """The step counts and schedules of one run, derived once from the config and the loader.

    Train, profile and the benchmarks read lr and tau from here, so every one of them runs the
    same schedule; both are pure functions of the step (a resumed run needs no schedule state).
    """

    steps_per_epoch: int
    total_steps: int  # train.max_steps, else train.epochs * steps_per_epoch
    warmup_steps: int  # optim.warmup_epochs * steps_per_epoch, at most total_steps - 1
    peak_lr: float  # the batch-scaled peak (optim.lr, else optim.base_lr * batch / 256)
    tau_base: float

    @classmethod
    def of(cls, cfg: Config, steps_per_epoch: int) -> RunPlan:
        """The plan of `cfg` for a loader of `steps_per_epoch` (>= 1) steps."""
        total = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
        warmup = min(total - 1, round(cfg.optim.warmup_epochs * steps_per_epoch))
        return cls(steps_per_epoch, total, warmup, cfg.optim.peak_lr(cfg.data.batch_size), cfg.byol.tau_base)

    def lr(self, step: int) -> float:
        """Learning rate of step `step` (0 past the end; see lr_at)."""
        return lr_at(step, self.total_steps, self.warmup_steps, self.peak_lr)

    def held_lr(self, step: int) -> float:
        """The lr of step `step` held at its peak once warm-up ends (optim.predictor_lr_hold's groups)."""
        return lr_at(min(step, self.warmup_steps), self.total_steps, self.warmup_steps, self.peak_lr)

    def tau(self, step: int) -> float:
        """Target EMA rate of step `step` (1 past the end; see tau_at)."""
        return tau_at(step, self.total_steps, self.tau_base)

    def epoch(self, step: int) -> int:
        """The epoch that step `step` belongs to."""
        return step // self.steps_per_epoch
