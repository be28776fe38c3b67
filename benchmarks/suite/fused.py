"""LARS + target EMA: their time against the eager step, and the kernels one LARS step launches."""

from __future__ import annotations

from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import fused_ops
from benchmarks.suite import records
from benchmarks.suite.context import Context
from fastbyol.byol import BYOL, param_groups
from fastbyol.models.resnet import resnet
from fastbyol.optim import LARS


def fused(ctx: Context) -> dict[str, Any]:
    """Run A: LARS step + EMA ms (foreach vs per-parameter loop) and their share of the eager step
    that the model stage measured in this run; then one LARS step's launches."""
    s, dev = ctx.sizes, torch.device(ctx.device)
    out: dict[str, Any] = fused_ops.measure(dev, s.fused_repeats, 3, s.depth, hidden=s.hidden, proj=s.proj)
    model = records.newest(ctx.out / records.RESULTS, "model", ctx.run_id)
    eager = next((v for v in (model or {}).get("variants", []) if v["name"] == "eager" and "step_ms" in v), None)
    out["eager_step_ms"] = eager["step_ms"] if eager else None
    for variant in ("foreach", "per-param loop"):
        ms = out["lars_ms"][variant] + out["ema_ms"][variant]
        out[f"share_{variant}"] = ms / eager["step_ms"] if eager else None
    ctx.save(out)
    out["lars_launches"] = lars_launches(dev, s.depth, s.hidden, s.proj)
    return out


def lars_launches(device: torch.device, depth: int, hidden: int, proj: int) -> dict[str, Any]:
    """One LARS step on BYOL's online parameters under torch.profiler: the aten ops it dispatches
    (top level: one per foreach op) and, on CUDA, the kernels it launches. A foreach op whose lists
    miss CUDA's multi-tensor route launches one kernel per tensor, so kernels >> ops shows it."""
    torch.manual_seed(0)
    encoder = resnet(depth, 1)
    byol = BYOL(encoder, encoder.num_features, hidden, proj).to(device, memory_format=torch.channels_last)
    groups = param_groups(byol, weight_decay=1.5e-6)
    opt = LARS(groups, lr=0.2, momentum=0.9, eta=1e-3)
    for g in groups:
        for p in g["params"]:
            p.grad = torch.randn_like(p) * 1e-3
    opt.step()  # creates the momentum buffers
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        opt.step()
        if cuda:
            torch.cuda.synchronize(device)
    events = prof.events()
    ops = [e for e in events if e.name.startswith("aten::") and
           (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    return {"tensors": [len(g["params"]) for g in groups], "aten_ops": len(ops),
            "cuda_kernels": len(kernels) if cuda else None}
