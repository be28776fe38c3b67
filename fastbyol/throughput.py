"""The profiler's three figures for one config on this rank, gathered over ranks.

Each figure is source images/sec (every image yields two views) over `steps` steps after `warmup`
untimed steps (fastbyol.timing: warm-up and compilation are never timed, and the device is
synchronised at both ends of a window):

1. loader only: `loader.epoch(...)` iterated with no model: both views made on the device;
2. model only: `train_step` (forward, backward, LARS, EMA) on synthetic views already on the
   device (`pipelines.synthetic.random_batch`, the per-rank batch at the config's crop size);
3. end to end: `train_step` fed by the real loader.

The optimizer + EMA share of the model step is timed part by part (fastbyol.timing.PartTimer:
CUDA events on a GPU). Under torchrun every rank measures its own figures; they are all-gathered
and the global figure is their sum.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import pipelines
from fastbyol import dist
from fastbyol.config import Config
from fastbyol.optim import RunPlan
from fastbyol.step import build_components, train_step
from fastbyol.timing import PartTimer, images_per_sec, synchronize
from pipelines.synthetic import random_batch

FIGURES = ("loader", "model", "end_to_end")
SHARE_STEPS = 5  # steps timed part by part for the optimizer + EMA share
TRACE_STEPS = 3  # end-to-end steps recorded by --trace


class DelayedLoader:
    """Diagnostic (`--loader-delay`): `loader` with `delay` seconds of sleep before each batch,
    i.e. an artificially slow loader; the profiler must then call the run loader-bound."""

    def __init__(self, loader: pipelines.TwoViewLoader, delay: float) -> None:
        self.loader, self.delay = loader, delay
        self.batch_size = loader.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[pipelines.Batch]:
        for batch in self.loader.epoch(epoch, start_step):
            time.sleep(self.delay)
            yield batch


def _endless(loader: pipelines.TwoViewLoader) -> Iterator[pipelines.Batch]:
    """Batches of epoch 0, 1, 2, ... (epoch start-up, e.g. worker launch, is part of the cost)."""
    epoch = 0
    while True:  # every loader has at least one step per epoch (its plan refuses fewer)
        yield from loader.epoch(epoch)
        epoch += 1


def measure(cfg: Config, info: dist.DistInfo, device: torch.device, steps: int, warmup: int,
            loader_delay: float = 0.0, trace_path: Path | None = None) -> dict:
    """The three figures of `cfg` on this rank, gathered over ranks. Returns batch_per_rank,
    crop_size, loader / model / end_to_end ({"images_per_sec": sum over ranks, "per_rank": [...]}),
    end_to_end_over_model, loader_over_model, peak_memory_bytes (per rank; None on CPU),
    optimizer_ema_share (mean over ranks, in [0, 1]) and trace (the trace file or None)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    # The loader first: a missing backend or data path fails before any model is built.
    loader = pipelines.build_loader(cfg.data, cfg.augment, device, info.rank, info.world_size, cfg.train.seed)
    if loader_delay > 0:
        loader = DelayedLoader(loader, loader_delay)
    batch = loader.batch_size
    crop = cfg.augment.view1.crop_size

    # 1. loader only
    with contextlib.closing(_endless(loader)) as batches:
        loader_rate = images_per_sec(lambda: next(batches), batch, steps, device, warmup)

    # 2. model only, on views already on the device
    plan = RunPlan.of(cfg, len(loader))
    c = build_components(cfg, device, info, plan.peak_lr)
    c.model.train()
    k = 0

    def step(view1: torch.Tensor, view2: torch.Tensor) -> None:
        nonlocal k  # the run's schedules, so lr and tau take the values of a real run (clipped past its end)
        train_step(c, view1, view2, plan.lr(k), plan.tau(k), plan.held_lr(k))
        k += 1

    views = random_batch(batch, crop, device, seed=cfg.train.seed, rank=info.rank)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model_rate = images_per_sec(lambda: step(views.view1, views.view2), batch, steps, device, warmup)
    peak = float(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else math.nan
    share = _optimizer_ema_share(c, lambda: step(views.view1, views.view2), device, min(SHARE_STEPS, steps))
    del views

    # 3. end to end
    with contextlib.closing(_endless(loader)) as batches:
        def fed() -> None:
            b = next(batches)
            step(b.view1, b.view2)

        e2e_rate = images_per_sec(fed, batch, steps, device, warmup)
        traced = _trace(fed, device, trace_path) if trace_path is not None else None

    rows = dist.gather_floats([loader_rate, model_rate, e2e_rate, peak, share], device)
    loader_r, model_r, e2e_r, peak_r, share_r = (list(col) for col in zip(*rows))
    figures = {name: {"images_per_sec": sum(r), "per_rank": r} for name, r in zip(FIGURES, (loader_r, model_r, e2e_r))}
    del c, loader
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model_total = figures["model"]["images_per_sec"]
    return {
        "batch_per_rank": batch, "crop_size": crop, **figures,
        "end_to_end_over_model": figures["end_to_end"]["images_per_sec"] / model_total,
        "loader_over_model": figures["loader"]["images_per_sec"] / model_total,
        "peak_memory_bytes": None if device.type != "cuda" else [int(p) for p in peak_r],
        "optimizer_ema_share": sum(share_r) / len(share_r),
        "trace": str(traced) if traced is not None else None,
    }


@contextlib.contextmanager
def _patched(obj: object, name: str, fn: Callable) -> Iterator[None]:
    """Replace `obj.name` by `fn` on the instance, restoring what was there (usually the class method)."""
    had = name in vars(obj)
    old = vars(obj).get(name)
    setattr(obj, name, fn)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


def _optimizer_ema_share(c: Any, step: Callable[[], None], device: torch.device, n: int) -> float:
    """Fraction of the step time spent in optimizer.step and ema.update, over `n` steps."""
    timer = PartTimer(device)
    with _patched(c.optimizer, "step", timer.wrap("optimizer", c.optimizer.step)), \
            _patched(c.ema, "update", timer.wrap("ema", c.ema.update)):
        for _ in range(n):
            with timer.part("step"):
                step()
    whole = timer.seconds("step")
    return (timer.seconds("optimizer") + timer.seconds("ema")) / whole if whole > 0 else math.nan


def _trace(step: Callable[[], None], device: torch.device, path: Path) -> Path:
    """A torch.profiler Chrome/Perfetto trace of TRACE_STEPS calls of `step`, written to `path`."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(TRACE_STEPS):
            with record_function(f"end_to_end_step_{i}"):
                step()
        synchronize(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    return path


__all__ = ["DelayedLoader", "FIGURES", "TRACE_STEPS", "measure"]
