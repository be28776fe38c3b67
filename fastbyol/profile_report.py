"""What `fastbyol profile` tells the user: the config keys that would help, and the tables.

`knobs` turns a verdict (fastbyol/verdict.py) into config keys to try, marked when the config
already uses them; `print_report` prints a report (fastbyol/profile.py's JSON) as rich tables.
"""

from __future__ import annotations

import os

import torch
from rich.console import Console
from rich.table import Table

from fastbyol.config import Config
from fastbyol.throughput import FIGURES
from fastbyol.verdict import HIDES_WELL

FEW_STEPS = 20  # fewer timed steps than this: the report warns that the figures are noisy


def knobs(cfg: Config, which: str, world_size: int = 1, peak_memory: int | None = None,
          device: torch.device | None = None) -> list[dict]:
    """Config keys that would help a `which` run (one of fastbyol.verdict.VERDICTS):
    dicts {key, current, suggestion, already}, `already` True when the config already uses it."""
    d, m = cfg.data, cfg.model
    cores = max(1, (os.cpu_count() or 1) // world_size)
    loader_side = [
        {"key": "data.num_workers", "current": d.num_workers, "already": d.num_workers >= cores,
         "suggestion": f"more loader workers ({cores} CPU cores per rank here)"},
        {"key": "data.prefetch", "current": d.prefetch, "already": d.prefetch >= 4,
         "suggestion": "deeper prefetch (e.g. 4) to absorb slow batches"},
        {"key": "data.backend", "current": d.backend, "already": d.backend in ("dali", "ffcv"),
         "suggestion": "dali (JPEG decode and augmentation on the GPU) or ffcv (pre-resized .beton)"},
        {"key": "augment.view1.crop_size", "current": cfg.augment.view1.crop_size, "already": None,
         "suggestion": "lower resolution: smaller stored images (fastbyol convert --max-res) or crops"},
    ]
    memory = ""
    if peak_memory and device is not None and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        memory = f" (peak {peak_memory / 2**30:.1f} of {total / 2**30:.1f} GiB used)"
    # NHWC and bf16 pay on GPU tensor cores; on a CPU without AMX bf16 autocast is far slower than
    # fp32 (28x for the quickstart step on a 2-core AVX2 machine), so they are GPU-only advice.
    on_gpu = device is not None and device.type == "cuda"
    gpu_side = [
        {"key": "model.channels_last", "current": m.channels_last, "already": m.channels_last,
         "suggestion": "NHWC convolutions (tensor cores)"},
        {"key": "train.precision", "current": cfg.train.precision, "already": cfg.train.precision != "fp32",
         "suggestion": "bf16 autocast"},
        {"key": "model.compile_mode", "current": m.compile_mode, "already": m.compile_mode == "reduce-overhead",
         "suggestion": "reduce-overhead: CUDA graphs replay the compiled networks (with model.compile)"},
    ]
    model_side = (gpu_side if on_gpu else []) + [
        {"key": "model.compile", "current": m.compile, "already": m.compile,
         "suggestion": "torch.compile the networks (fewer, fused kernels)"},
        {"key": "data.batch_size", "current": d.batch_size, "already": None,
         "suggestion": f"a larger batch if memory allows{memory} (lr scales with it)"},
        {"key": "byol.concat_views", "current": cfg.byol.concat_views, "already": cfg.byol.concat_views,
         "suggestion": "one encoder call on both views (BN statistics then span both views)"},
    ]
    contention_side = [
        {"key": "data.num_workers", "current": d.num_workers, "already": None,
         "suggestion": f"fewer loader workers, leaving cores to the step ({cores} CPU cores per rank here)"},
        loader_side[2],  # decode on the GPU: DALI's workers need few CPU cores
        {"key": "data.prefetch", "current": d.prefetch, "already": d.prefetch >= 4,
         "suggestion": "deeper prefetch, so copies overlap the step"},
    ]
    sides = {"loader-bound": loader_side, "model-bound": model_side, "contention": contention_side}
    return sides.get(which, loader_side + model_side)


def print_report(report: dict, title: str) -> None:
    """The rich tables: three figures, ratio, verdict with evidence and knobs (or one row per sweep value)."""
    out = Console(highlight=False)
    machine = report["machine"]
    delay = report["loader_delay_s"]
    out.print(f"[bold]{title}[/bold] — {machine['gpu']}, {machine['cpu_count']} CPUs, torch {machine['torch']}, "
              f"{report['world_size']} rank(s); {report['steps']} timed steps after {report['warmup']} warm-up"
              + (f"; loader delayed {delay} s/batch (diagnostic)" if delay else ""))
    if report["steps"] < FEW_STEPS:
        out.print(f"[yellow]note:[/yellow] {report['steps']} timed steps give noisy figures; "
                  f"use --steps {FEW_STEPS} or more")
    if report["sweep_key"]:
        cuda = report["device"].startswith("cuda")
        table = Table(title=f"sweep of {report['sweep_key']} (source images/sec, all ranks)")
        columns = ["value", "loader only", "model only", "end to end", "e2e / model"] + (["peak mem"] if cuda else [])
        for col in columns + ["verdict"]:
            table.add_column(col, justify="left" if col in ("value", "verdict") else "right", no_wrap=col == "verdict")
        for run in report["runs"]:
            cells = [str(run["sweep_value"]), *(f"{run[k]['images_per_sec']:.1f}" for k in FIGURES),
                     f"{run['end_to_end_over_model']:.2f}"] + ([_gib(run["peak_memory_bytes"])] if cuda else [])
            table.add_row(*cells, run["verdict"])
        out.print(table)
        return
    run = report["runs"][0]
    many = report["world_size"] > 1
    table = Table(title=f"throughput, source images/sec (batch {run['batch_per_rank']}/rank, {run['crop_size']} px)")
    table.add_column("measurement")
    table.add_column("images/sec" + (" (sum)" if many else ""), justify="right")
    if many:
        table.add_column("per rank", justify="right")
    table.add_column("what runs")
    what = {"loader": "both views made on the device, no model",
            "model": "train_step, synthetic views on the device",
            "end_to_end": "train_step fed by the loader"}
    for name, label in (("loader", "loader only"), ("model", "model only"), ("end_to_end", "end to end")):
        f = run[name]
        cells = [label, f"{f['images_per_sec']:.1f}"]
        if many:
            cells.append(" ".join(f"{r:.1f}" for r in f["per_rank"]))
        table.add_row(*cells, what[name])
    out.print(table)
    out.print(f"end-to-end / model-only = [bold]{run['end_to_end_over_model']:.2f}[/bold] (goal >= {HIDES_WELL}); "
              f"optimizer + EMA = {100 * run['optimizer_ema_share']:.1f} % of the step; "
              f"peak memory {_gib(run['peak_memory_bytes'])}")
    out.print(f"verdict: [bold]{run['verdict']}[/bold]")
    for line in run["evidence"]:
        out.print(f"  - {line}")
    knob_table = Table(title="knobs that would help")
    for col in ("key", "now", "try", "already"):
        knob_table.add_column(col)
    for k in run["knobs"]:
        knob_table.add_row(k["key"], str(k["current"]), k["suggestion"],
                           {True: "yes", False: "no", None: "-"}[k["already"]])
    out.print(knob_table)
    if run["trace"]:
        out.print(f"trace: {run['trace']} (open in https://ui.perfetto.dev or chrome://tracing)")


def _gib(peaks: list[int] | None) -> str:
    return "n/a (cpu)" if not peaks else f"{max(peaks) / 2**30:.2f} GiB"


__all__ = ["FEW_STEPS", "knobs", "print_report"]
