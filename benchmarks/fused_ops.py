"""Fused (foreach) LARS step and target EMA update vs a per-parameter loop, on BYOL's ResNet-50.

    python benchmarks/fused_ops.py --device cpu --repeats 30 --threads 1
    python benchmarks/fused_ops.py --device cuda --repeats 200 --width 1

Parameters: the online ResNet-50 encoder + projector + predictor (LARS, two groups as in
fastbyol.byol.param_groups); the EMA covers encoder + projector. Gradients are random (the cost of
both ops does not depend on the values). Variants are timed interleaved, one call each per round,
so a change of machine load hits them alike; the table gives the median over the rounds.
"GB/s" is the least memory traffic the op needs (LARS: read g, w, buf, write buf, w = 5 passes;
EMA: read xi, theta, write xi = 3 passes) divided by the time: compare it with the device's peak.
On a CPU, foreach ops are C++ loops over the tensors (no multi-tensor kernel), so expect foreach ~
loop there; with several threads on a busy machine every per-tensor OpenMP region can stall, which
favours the flat buffer (one region) far more than on an idle one: use --threads 1 for stable numbers.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from typing import Callable

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from fastbyol.byol import BYOL, param_groups
from fastbyol.ema import TargetEMA
from fastbyol.models.resnet import resnet
from fastbyol.optim import LARS
from fastbyol.timing import interleaved


# ---------------------------------------------------------------- the flat-buffer EMA variant

# Offsets of the views in a flat buffer are multiples of this many elements (256 bytes for fp32),
# so every parameter starts where a fresh allocation would: vector loads and cuDNN stay aligned.
_ALIGN = 64


class FlatEMA:
    """TargetEMA's update as one ``lerp_`` over one flat buffer per network.

    The parameters of both networks are re-homed as views into one contiguous buffer each (see
    ``flatten_``); build it AFTER any ``.to(device)`` / ``.to(memory_format=...)`` of the modules
    (those replace ``param.data`` and would cut the views): ``update`` checks this and raises.
    """

    def __init__(self, ema: TargetEMA) -> None:
        self.ema = ema
        self.online_flat = flatten_(ema.online)
        # The target takes the online layout (strides) too, so both flat buffers line up element by element.
        self.target_flat = flatten_(ema.target, like=ema.online)

    @torch.no_grad()
    def update(self, tau: float) -> None:
        """xi <- tau * xi + (1 - tau) * theta, as TargetEMA.update, in one kernel."""
        for params, flat in ((self.ema.online, self.online_flat), (self.ema.target, self.target_flat)):
            storage = flat.untyped_storage().data_ptr()
            if any(p.untyped_storage().data_ptr() != storage for p in params):
                raise RuntimeError(
                    "FlatEMA: a parameter no longer lives in the flat buffer (its .data was replaced, "
                    "e.g. by .to(), .cuda() or .to(memory_format=...) after FlatEMA was built); "
                    "build FlatEMA after moving the modules"
                )
        self.target_flat.lerp_(self.online_flat, 1.0 - tau)
        if self.ema.target_counters:
            torch._foreach_copy_(self.ema.target_counters, self.ema.online_counters)


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



def _median_ms(fns: dict[str, Callable[[], None]], repeats: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Median milliseconds per call of each fn, one call per fn per round (fastbyol.timing.interleaved)."""
    return {name: 1e3 * statistics.median(s) for name, s in interleaved(fns, 1, device, warmup, repeats).items()}


def per_param_ema(target: list[torch.Tensor], online: list[torch.Tensor], tau: float) -> None:
    with torch.no_grad():
        for xi, theta in zip(target, online):
            xi.lerp_(theta, 1.0 - tau)


def measure(device: torch.device, repeats: int, warmup: int, depth: int = 50, width: int = 1,
            hidden: int = 4096, proj: int = 256) -> dict:
    """Median ms per call of the LARS step and the target EMA, per variant, on BYOL's ResNet-`depth`:
    {"lars_ms": {variant: ms}, "ema_ms": {...}, "lars_tensors", "lars_params", "ema_tensors", "ema_params"}."""
    torch.manual_seed(0)
    encoder = resnet(depth, width)
    byol = BYOL(encoder, encoder.num_features, hidden, proj).to(device)
    byol_flat = copy.deepcopy(byol)  # flattening re-homes parameters: keep it off the other variants
    groups = param_groups(byol, weight_decay=1.5e-6)
    online = [p for g in groups for p in g["params"]]
    for p in online:
        p.grad = torch.randn_like(p) * 1e-3

    lars = {
        "per-param loop": LARS(groups, lr=0.2, momentum=0.9, eta=1e-3, foreach=False),
        "foreach": LARS(groups, lr=0.2, momentum=0.9, eta=1e-3, foreach=True),
    }
    ema_foreach = TargetEMA(byol.online_network(), byol.target_network())
    ema_flat = FlatEMA(TargetEMA(byol_flat.online_network(), byol_flat.target_network()))
    ema = {
        "per-param loop": lambda: per_param_ema(ema_foreach.target, ema_foreach.online, 0.996),
        "foreach": lambda: ema_foreach.update(0.996),
        "flat": lambda: ema_flat.update(0.996),
    }
    return {"lars_ms": _median_ms({k: o.step for k, o in lars.items()}, repeats, warmup, device),
            "ema_ms": _median_ms(ema, repeats, warmup, device),
            "lars_tensors": len(online), "lars_params": sum(p.numel() for p in online),
            "ema_tensors": len(ema_foreach.online),
            "ema_params": sum(p.numel() for p in byol.online_network().parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls of each variant first")
    parser.add_argument("--width", type=int, default=1, help="ResNet-50 width multiplier (1, 2, 4)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)  # on a shared machine, fewer threads than cores avoids stalls
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    device = torch.device(args.device)
    m = measure(device, args.repeats, args.warmup, width=args.width)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    table = Table(title=f"fused ops, BYOL ResNet-50 x{args.width}, fp32, {name}, median of {args.repeats}")
    for col in ("op", "tensors", "params", "variant", "ms / step", "GB/s", "speed-up vs loop"):
        table.add_column(col, justify="left" if col in ("op", "variant") else "right")
    rows = [
        ("LARS step", m["lars_tensors"], m["lars_params"], 5, m["lars_ms"]),
        ("target EMA", m["ema_tensors"], m["ema_params"], 3, m["ema_ms"]),
    ]
    for op, tensors, numel, passes, results in rows:
        base = results["per-param loop"]
        for variant, ms in results.items():
            gbps = passes * numel * 4 / (ms * 1e-3) / 1e9
            table.add_row(op, str(tensors), f"{numel / 1e6:.1f}M", variant, f"{ms:.3f}", f"{gbps:.1f}", f"{base / ms:.2f}x")
        table.add_section()
    Console().print(table)


if __name__ == "__main__":
    main()
