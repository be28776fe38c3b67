"""The supervised ceiling: one view, forward + backward, SGD, on the same GPU in the same run.

A BYOL image costs about 8/3 of a supervised one (2 views x online forward + backward + target
forward), so 3/8 of the best supervised images/sec is the bar fastbyol's model-only step is read
against (DESIGN.md, "Throughput, how it is measured").
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from benchmarks.suite.context import Context
from benchmarks.suite.model import rate
from benchmarks.suite.sizes import BYOL_COST
from fastbyol.models.resnet import resnet


def _supervised_rate(ctx: Context, compiled: bool) -> float:
    """images/sec of a ResNet + Linear(1000) step, bf16 autocast on CUDA, channels_last, cuDNN benchmark."""
    s, dev = ctx.sizes, torch.device(ctx.device)
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    encoder = resnet(s.depth, 1, s.stem)
    model = nn.Sequential(encoder, nn.Linear(encoder.num_features, 1000)).to(dev, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(s.batch, 3, s.size, s.size, device=dev).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (s.batch,), device=dev)
    net = torch.compile(model, backend=s.compile_backend) if compiled else model
    dtype = torch.bfloat16 if ctx.cuda else None

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()

    return rate(step, s.batch, ctx)


def _result(ctx: Context, variant: str, measure: Callable[[], float]) -> dict[str, Any]:
    s = ctx.sizes
    result: dict[str, Any] = {"model": f"ResNet-{s.depth} ({s.stem} stem) + Linear(1000), SGD momentum",
                              "variant": variant, "batch": s.batch, "size": s.size, "channels_last": True,
                              "precision": ctx.precision}
    ips = measure()
    return {**result, "images_per_sec": ips, "byol_bar": ips / BYOL_COST,
            **({"compile_backend": s.compile_backend} if variant == "compiled" else {})}


def ceiling(ctx: Context) -> dict[str, Any]:
    """Run A: the eager supervised step, and its 3/8, the BYOL bar."""
    return _result(ctx, "eager", lambda: _supervised_rate(ctx, compiled=False))


def ceiling_compiled(ctx: Context) -> dict[str, Any]:
    """Run B: the same step through torch.compile (the bar is 3/8 of the faster of the two)."""
    return _result(ctx, "compiled", lambda: _supervised_rate(ctx, compiled=True))
