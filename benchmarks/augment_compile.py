"""Does compiling the view augmentation pay? gpu_augment.apply_params eager vs torch.compile.

For each view policy (the paper's T and T'): the median milliseconds of one view's augmentation
of a (batch, 3, size, size) float batch, eager and compiled (`fullgraph=True`, static shapes;
the draws stay eager, gpu_augment's rule), timed alternately in one loop; the first compiled
call's seconds (the cold compile every run pays once); and the largest difference between the
two outputs. The GPU suite calls `measure(torch.device("cuda"))`; a CPU run checks the plumbing:

    python -m benchmarks.augment_compile --device cuda --batch 256 --size 224
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from fastbyol.timing import interleaved, time_window
from pipelines.gpu_augment import apply_params, draw_params
from pipelines.policy import AugmentConfig


def measure(device: torch.device, batch: int = 256, size: int = 224, repeats: int = 20, warmup: int = 3,
            views: tuple[str, ...] = ("view1", "view2"), backend: str = "inductor", mode: str | None = None) -> dict:
    """{view: {eager_ms, compiled_ms, speedup (eager / compiled), compile_s, max_abs_diff}} plus
    the settings; ms are medians per call over `repeats` alternated rounds after `warmup`."""
    augment = AugmentConfig()
    augment.set_crop_size(size)
    x = torch.rand(batch, 3, size, size, device=device, generator=torch.Generator(device).manual_seed(0))
    out: dict = {"device": str(device), "batch": batch, "size": size, "backend": backend, "mode": mode,
                 "torch": torch.__version__}
    for name in views:
        policy = getattr(augment, name)
        params = draw_params(batch, policy, torch.Generator(device).manual_seed(1), device)
        torch._dynamo.reset()  # each policy pays its own cold compile
        compiled = torch.compile(apply_params, fullgraph=True, dynamic=False, backend=backend, mode=mode)
        compile_s = time_window(lambda: compiled(x, params, policy), 1, device)
        diff = (compiled(x, params, policy) - apply_params(x, params, policy)).abs().max().item()
        fns = {"eager": lambda: apply_params(x, params, policy), "compiled": lambda: compiled(x, params, policy)}
        seconds = interleaved(fns, 1, device, warmup=warmup, rounds=repeats)
        eager, comp = (statistics.median(seconds[k]) * 1e3 for k in ("eager", "compiled"))
        out[name] = {"eager_ms": eager, "compiled_ms": comp, "speedup": eager / comp,
                     "compile_s": compile_s, "max_abs_diff": diff}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=256, help="images per view (the per-GPU batch)")
    parser.add_argument("--size", type=int, default=224, help="view side, pixels")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--views", default="view1,view2", help="which policies, comma-separated")
    parser.add_argument("--mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    args = parser.parse_args()
    result = measure(torch.device(args.device), args.batch, args.size, args.repeats,
                     views=tuple(args.views.split(",")), mode=args.mode)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
