"""fastbyol's model-only step on synthetic views already on the device: no loading is timed.

Every figure goes through benchmarks/peers.py (fastbyol's `build_components` + `train_step`, the
same warm-up and windows as the peers), except the one-rank DDP variant, which wraps the step in
DDP itself. images/sec counts source images (each gives two views).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from typing import Any, Callable

import torch

from benchmarks import peers
from benchmarks.suite.context import Context
from fastbyol.timing import images_per_sec

SWEEP_FILE = "step_time_vs_batch.jsonl"  # read by the scale-out model: batch, step_time_s, images_per_sec
# One rank: DDP's buckets and hooks run, but torch's SyncBatchNorm falls back to plain BatchNorm at
# world size 1, so no statistics all-reduce is measured: the row must not read as "SyncBN's cost".
DDP_LABEL = "DDP over 1 rank (SyncBN not measured: plain BN at world size 1)"


def rate(step: Callable[[], Any], batch: int, ctx: Context) -> float:
    """Median images/sec over `rounds` windows of `steps` calls, after `warmup` calls (fastbyol.timing)."""
    s = ctx.sizes
    return images_per_sec(step, batch, s.steps, torch.device(ctx.device), s.warmup, s.rounds)


def settings(ctx: Context, contenders: tuple[str, ...] = ("fastbyol",), overrides: tuple[str, ...] = (),
             batch: int | None = None, steps: int | None = None) -> peers.Settings:
    """benchmarks/peers.py's settings for this suite's sizes."""
    s = ctx.sizes
    return peers.Settings(depth=s.depth, stem=s.stem, size=s.size, batch=batch or s.batch, hidden=s.hidden,
                          proj=s.proj, steps=steps or s.steps, warmup=s.warmup, rounds=s.rounds, device=ctx.device,
                          contenders=contenders, fastbyol_overrides=overrides)


def _row(name: str, overrides: tuple[str, ...], batch: int, measure: Callable[[], dict]) -> dict[str, Any]:
    """One variant's figures, or its error in one line (one broken option must not hide the others)."""
    row: dict[str, Any] = {"name": name, "batch": batch, "overrides": list(overrides)}
    try:
        got = measure()
        row.update({k: got[k] for k in ("images_per_sec", "step_ms", "peak_memory_bytes", "stride_warnings",
                                        "compile_seconds") if k in got})
    except Exception as e:  # noqa: BLE001 - recorded, and the next variant runs
        row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the next variant starts from the same free memory
    return row


def _fastbyol(ctx: Context, overrides: tuple[str, ...], batch: int | None = None) -> dict[str, Any]:
    return peers.run(settings(ctx, ("fastbyol",), overrides, batch))["contenders"][0]


def model(ctx: Context) -> dict[str, Any]:
    """Run A: eager and byol.concat_views at the headline batch, then host syncs inside one step."""
    result: dict[str, Any] = {"variants": []}
    for name, overrides in (("eager", ()), ("concat_views", ("byol.concat_views=true",))):
        result["variants"].append(_row(name, overrides, ctx.sizes.batch, lambda: _fastbyol(ctx, overrides)))
        ctx.save(result)
    result["host_syncs"] = host_syncs(ctx)
    return result


def peer_step(ctx: Context) -> dict[str, Any]:
    """Run A: fastbyol, fastbyol-concat, lightly and byol-pytorch, alternated rounds in one process."""
    return peers.run(settings(ctx, ("fastbyol", "fastbyol-concat", "lightly", "byol-pytorch"),
                              steps=ctx.sizes.peer_steps))


def sweep(ctx: Context) -> dict[str, Any]:
    """Run A: the eager step at each per-GPU batch of `sweep_batches`, smallest first; each figure is
    appended to OUT/step_time_vs_batch.jsonl the moment it is measured (benchmarks/scaling_model.py
    --sweep reads it)."""
    s = ctx.sizes
    gpu = torch.cuda.get_device_name() if ctx.cuda else "cpu"
    result: dict[str, Any] = {"file": SWEEP_FILE, "points": []}
    for batch in s.sweep_batches:
        row = _row("eager", (), batch, lambda: _fastbyol(ctx, (), batch))
        point = {"batch": batch, "step_time_s": row["step_ms"] / 1e3 if "step_ms" in row else None,
                 "images_per_sec": row.get("images_per_sec"), "peak_memory_bytes": row.get("peak_memory_bytes"),
                 "error": row.get("error"), "gpu": gpu, "variant": "eager, per-view BatchNorm",
                 "depth": s.depth, "size": s.size, "precision": ctx.precision, "run": ctx.run_id}
        if point["error"] is None:  # the file holds measured points only; an error stays in results.jsonl
            with (ctx.out / SWEEP_FILE).open("a") as f:
                f.write(json.dumps(point) + "\n")
        result["points"].append(point)
        ctx.save(result)
    return result


def host_syncs(ctx: Context) -> str:
    """'none' if one fastbyol step runs under torch.cuda.set_sync_debug_mode('error'), else the error."""
    if not ctx.cuda:
        return "not checked on cpu (tests/test_step_options.py forbids host conversions instead)"
    dev = torch.device(ctx.device)
    contender, _ = peers.build_fastbyol(settings(ctx, batch=min(ctx.sizes.batch, 32)), "bf16", dev)
    contender.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        contender.step()
        return "none"
    except RuntimeError as e:
        return str(e).splitlines()[0][:300]
    finally:
        torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()


def ddp(ctx: Context) -> dict[str, Any]:
    """Run B: the step wrapped in DDP over a one-rank group, without and with gradient_as_bucket_view,
    counting DDP's "grad strides do not match bucket view strides" warnings under channels_last."""
    result: dict[str, Any] = {"label": DDP_LABEL, "variants": []}
    for name, overrides in (("ddp 1 rank", ("dist.gradient_as_bucket_view=false",)),
                            ("ddp 1 rank, gradient_as_bucket_view", ("dist.gradient_as_bucket_view=true",))):
        result["variants"].append(_row(name, overrides, ctx.sizes.batch, lambda: _ddp_one_rank(ctx, overrides)))
        ctx.save(result)
    return result


def _ddp_one_rank(ctx: Context, overrides: tuple[str, ...]) -> dict[str, Any]:
    import torch.distributed as tdist

    from fastbyol import dist
    from fastbyol.config import load_config
    from fastbyol.step import build_components, train_step
    from pipelines.synthetic import random_batch

    class OneRank(dist.DistInfo):
        enabled = True  # a real DDP wrap although the group has one rank

    s, dev = ctx.sizes, torch.device(ctx.device)
    if ctx.cuda and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())  # DDP's device_ids need the index
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if ctx.cuda else "gloo", rank=0, world_size=1,
                                 init_method=f"file://{ctx.work / f'ddp-store-{os.getpid()}'}",
                                 device_id=dev if ctx.cuda else None)
    cfg = load_config(None, ["data.backend=synthetic", f"data.batch_size={s.batch}", f"model.depth={s.depth}",
                             f"model.stem={s.stem}", f"byol.hidden_dim={s.hidden}", f"byol.proj_dim={s.proj}",
                             f"train.precision={ctx.precision}", *overrides])
    c = build_components(cfg, dev, OneRank(), cfg.optim.peak_lr(s.batch))
    views = random_batch(s.batch, s.size, dev)
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    torch.set_warn_always(True)  # DDP warns once per process: every variant must show its own
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ips = rate(lambda: train_step(c, views.view1, views.view2, 0.1, 0.99), s.batch, ctx)
    finally:
        torch.set_warn_always(False)
    strides = sorted({str(w.message).splitlines()[0][:200] for w in caught if "stride" in str(w.message).lower()})
    return {"images_per_sec": ips, "step_ms": 1e3 * s.batch / ips, "stride_warnings": strides,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(dev) if ctx.cuda else None}


def _compiled(ctx: Context, name: str, overrides: tuple[str, ...], skip: str | None) -> dict[str, Any]:
    """One compiled variant: the first step's seconds (the compilation) saved before the timed windows."""
    result: dict[str, Any] = {"variants": []}
    if skip:
        return {**result, "skipped": skip}
    overrides = ("model.compile=true", f"model.compile_backend={ctx.sizes.compile_backend}", *overrides)

    def measure() -> dict[str, Any]:
        built = peers.build_contenders(settings(ctx, ("fastbyol",), overrides))
        start = time.perf_counter()
        built.contenders[0].step().item()  # compiles; .item() waits for the step to finish
        compile_s = time.perf_counter() - start
        ctx.save({**result, "compile_seconds": compile_s})  # a stage cut by its budget still says this
        return {**peers.run(settings(ctx, ("fastbyol",), overrides), built)["contenders"][0],
                "compile_seconds": compile_s}

    result["variants"].append(_row(name, overrides, ctx.sizes.batch, measure))
    return result


def compiled(ctx: Context) -> dict[str, Any]:
    """Run B: model.compile (the online and the target network, model.compile_mode default)."""
    return _compiled(ctx, "compile", (), None)


def cudagraphs(ctx: Context) -> dict[str, Any]:
    """Run B: model.compile_mode=reduce-overhead (CUDA graphs through torch.compile)."""
    skip = None if ctx.cuda and ctx.sizes.compile_backend == "inductor" else "CUDA graphs need CUDA and inductor"
    return _compiled(ctx, "compile+cudagraphs", ("model.compile_mode=reduce-overhead",), skip)
