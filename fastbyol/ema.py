"""The BYOL target update xi <- tau * xi + (1 - tau) * theta, as one multi-tensor kernel.

BatchNorm running statistics: the target keeps its OWN running_mean / running_var, the ones its
own forward passes accumulate, as the official code does (byol_experiment.py carries a separate
target_state). They never influence training: the target runs in train mode, so its BatchNorm
normalizes with batch statistics, and only the online encoder is evaluated and exported. EMA-ing
or copying them would cost one more kernel per step for nothing. Integer buffers
(num_batches_tracked) are copied from the online network so both count the same steps.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TargetEMA", "flatten_"]

# Offsets of the views in a flat buffer are multiples of this many elements (256 bytes for fp32),
# so every parameter starts where a fresh allocation would: vector loads and cuDNN stay aligned.
_ALIGN = 64


class TargetEMA:
    """Moves the target's parameters towards the online network's after each optimizer step.

    Args:
        online: the online module (e.g. encoder + projector), updated by the optimizer.
        target: a module of identical structure (same parameter names and shapes, in order).
        flat: False (default): one ``torch._foreach_lerp_`` over the parameter lists. True: the
            parameters of both modules are re-homed as views into one contiguous buffer each
            (see ``flatten_``), and the update is one ``lerp_`` over one tensor. It must then be
            built AFTER any ``.to(device)`` / ``.to(memory_format=...)`` of the modules (those
            replace ``param.data`` and would cut the views); ``update`` checks this and raises.
            Why foreach is the default (benchmarks/fused_ops.py, ResNet-50 encoder + projector,
            33M parameters in 165 tensors): on one CPU thread flat is only ~1.1x faster than
            foreach (35 vs 38 ms), on a GPU both are one or a few memory-bound kernels, and the
            flat buffer has costs elsewhere: the build-after-.to() rule, and torch.save of a
            single view (an exported CPU encoder) writes the whole buffer unless cloned first.
    """

    def __init__(self, online: nn.Module, target: nn.Module, flat: bool = False) -> None:
        online_named, target_named = list(online.named_parameters()), list(target.named_parameters())
        _check_same_structure(online_named, target_named, kind="parameter")
        self.online = [p for _, p in online_named]
        self.target = [p for _, p in target_named]
        online_buffers, target_buffers = list(online.named_buffers()), list(target.named_buffers())
        _check_same_structure(online_buffers, target_buffers, kind="buffer")
        counters = [(o, t) for (_, o), (_, t) in zip(online_buffers, target_buffers) if not o.is_floating_point()]
        self.online_counters = [o for o, _ in counters]
        self.target_counters = [t for _, t in counters]
        self.flat = bool(flat)
        if self.flat:
            self.online_flat = flatten_(self.online)
            # The target takes the online layout (strides) too, so both flat buffers line up element by element.
            self.target_flat = flatten_(self.target, like=self.online)

    @torch.no_grad()
    def update(self, tau: float) -> None:
        """xi <- tau * xi + (1 - tau) * theta for every target parameter xi; tau in [0, 1]."""
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"TargetEMA.update: tau = {tau!r}, expected a number in [0, 1]")
        if self.flat:
            self._check_views()
            self.target_flat.lerp_(self.online_flat, 1.0 - tau)
        else:
            torch._foreach_lerp_(self.target, self.online, 1.0 - tau)
        if self.target_counters:
            torch._foreach_copy_(self.target_counters, self.online_counters)

    @torch.no_grad()
    def copy_online_to_target(self) -> None:
        """xi <- theta (the BYOL initialisation of the target; same as update(0.0))."""
        self.update(0.0)

    def _check_views(self) -> None:
        for params, flat in ((self.online, self.online_flat), (self.target, self.target_flat)):
            storage = flat.untyped_storage().data_ptr()
            if any(p.untyped_storage().data_ptr() != storage for p in params):
                raise RuntimeError(
                    "TargetEMA(flat=True): a parameter no longer lives in the flat buffer (its .data was replaced, "
                    "e.g. by .to(), .cuda() or .to(memory_format=...) after TargetEMA was built); "
                    "build TargetEMA after moving the modules, or use flat=False"
                )


def flatten_(params: list[nn.Parameter], like: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Re-home `params` as views into one new contiguous 1-D buffer, which is returned.

    Each ``p.data`` becomes a view of the buffer with the strides of ``like[i]`` (default: of p
    itself, so a channels_last weight stays channels_last), starting at an offset aligned to 64
    elements. The Parameter objects stay the same, so optimizers, hooks and DDP that hold them are
    unaffected; gradients stay separate tensors. All params must share one device and dtype.
    Shape: the buffer has sum of (numel rounded up to 64) elements; padding is zeros.
    """
    like = params if like is None else like
    if not params:
        return torch.zeros(0)
    device, dtype = params[0].device, params[0].dtype
    offsets, total = [], 0
    for i, (p, ref) in enumerate(zip(params, like)):
        if p.device != device or p.dtype != dtype:
            raise ValueError(f"flatten_: parameter {i} is {p.dtype} on {p.device}, expected {dtype} on {device}")
        if p.shape != ref.shape:
            raise ValueError(f"flatten_: parameter {i} has shape {tuple(p.shape)}, expected {tuple(ref.shape)}")
        offsets.append(total)
        total += -(-p.numel() // _ALIGN) * _ALIGN
    flat = torch.zeros(total, device=device, dtype=dtype)
    with torch.no_grad():
        for p, ref, offset in zip(params, like, offsets):
            view = flat.as_strided(p.shape, _dense_strides(ref), offset)
            view.copy_(p)
            p.data = view
    return flat


def _dense_strides(t: torch.Tensor) -> tuple[int, ...]:
    """t's strides if they describe a dense layout of exactly numel elements, else contiguous ones."""
    if t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)):
        return t.stride()
    return torch.empty(t.shape, device="meta").stride()


def _check_same_structure(online: list, target: list, kind: str) -> None:
    if len(online) != len(target):
        raise ValueError(f"TargetEMA: online has {len(online)} {kind}s, target has {len(target)}; expected the same module structure")
    for (name_o, o), (name_t, t) in zip(online, target):
        if name_o != name_t or o.shape != t.shape or o.dtype != t.dtype or o.device != t.device:
            raise ValueError(
                f"TargetEMA: online {kind} {name_o!r} {tuple(o.shape)} {o.dtype} {o.device} does not match "
                f"target {kind} {name_t!r} {tuple(t.shape)} {t.dtype} {t.device}"
            )
