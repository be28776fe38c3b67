"""Does compiling the view augmentation pay? benchmarks/augment_compile.py at the suite's sizes."""

from __future__ import annotations

from typing import Any

import torch

from benchmarks import augment_compile
from benchmarks.suite.context import Context


def augment(ctx: Context) -> dict[str, Any]:
    """Run B: one view's augmentation eager vs torch.compile, per policy (view1 saved before view2's
    cold compile): ms per call, compile seconds, largest difference."""
    s, dev = ctx.sizes, torch.device(ctx.device)
    result: dict[str, Any] = {}
    for view in ("view1", "view2"):
        got = augment_compile.measure(dev, s.batch, s.size, repeats=max(2, s.fused_repeats // 5), warmup=s.warmup,
                                      views=(view,), backend=s.compile_backend)
        result = {**got, **{k: v for k, v in result.items() if k.startswith("view")}}
        ctx.save(result)
    return result
