"""`fastbyol profile CONFIG`: where do the images/sec go?

For one config, three figures side by side, each in source images/sec (every image yields two
views) over `steps` steps after `warmup` steps (warm-up and compilation are never timed):

1. loader only: `loader.epoch(...)` iterated with no model: both views made on the device;
2. model only: `train_step` (forward, backward, LARS, EMA) on synthetic views already on the
   device (`pipelines.synthetic.random_batch`, the per-rank batch at the config's crop size);
3. end to end: `train_step` fed by the real loader.

On CUDA a window is bracketed by `torch.cuda.synchronize()` and the optimizer / EMA parts by CUDA
events; on CPU by `time.perf_counter()` (CPU kernels are synchronous). Under torchrun every rank
measures its own figures; they are all-gathered and the global figure is their sum.

The verdict (fastbyol/verdict.py) compares the figures by explicit rules; the knobs (see `knobs`) are
the config keys that would help for that verdict, marked when the config already uses them.
Nothing is written to the config's run_dir: `train()` is never called.

`--json OUT` writes (keys documented here and in JSON_KEYS / RUN_KEYS / MACHINE_KEYS):
    machine: gpu (name or "cpu"), gpu_memory_bytes, cpu_count, torch, cuda, dali, ffcv, python,
             platform (versions are None when the package is absent)
    config: the base config as a dict;  world_size, device, steps, warmup, loader_delay_s
    sweep_key: the swept key or None;  runs: one entry per sweep value (one entry without --sweep):
        sweep_value, batch_per_rank, crop_size, config,
        loader / model / end_to_end: {"images_per_sec": global sum, "per_rank": [...]},
        end_to_end_over_model, loader_over_model,
        peak_memory_bytes: per rank (None on CPU), optimizer_ema_share: mean over ranks in [0, 1],
        verdict, evidence (list of strings), knobs (list of {key, current, suggestion, already}),
        trace: path of this rank-0 trace file or None
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

import pipelines
from fastbyol import dist
from fastbyol.config import Config, ConfigError, load_config, to_dict
from fastbyol.optim import RunPlan
from fastbyol.step import build_components, train_step
from fastbyol.verdict import HIDES_WELL, VERDICTS, verdict
from pipelines.synthetic import random_batch

JSON_KEYS = ("machine", "config", "world_size", "device", "steps", "warmup", "loader_delay_s", "sweep_key", "runs")
RUN_KEYS = ("sweep_value", "batch_per_rank", "crop_size", "config", "loader", "model", "end_to_end",
            "end_to_end_over_model", "loader_over_model", "peak_memory_bytes", "optimizer_ema_share",
            "verdict", "evidence", "knobs", "trace")
MACHINE_KEYS = ("gpu", "gpu_memory_bytes", "cpu_count", "torch", "cuda", "dali", "ffcv", "python", "platform")

SHARE_STEPS = 5  # steps timed part by part for the optimizer + EMA share
TRACE_STEPS = 3  # end-to-end steps recorded by --trace
FIGURES = ("loader", "model", "end_to_end")
FEW_STEPS = 20  # fewer timed steps than this: the report warns that the figures are noisy


# ---------------------------------------------------------------- timing


def _now(device: torch.device) -> float:
    """Seconds on the host clock once every kernel queued on `device` has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _rate(step: Callable[[], None], images_per_step: int, steps: int, warmup: int, device: torch.device) -> float:
    """Images/sec of `steps` calls of `step` after `warmup` untimed calls."""
    for _ in range(warmup):
        step()
    start = _now(device)
    for _ in range(steps):
        step()
    elapsed = _now(device) - start
    return steps * images_per_step / elapsed if elapsed > 0 else math.inf


class _PartTimer:
    """Accumulated seconds per named part: CUDA events on a GPU, perf_counter on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.spans: dict[str, list] = {}

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.spans.setdefault(name, []).append((start, end))
        else:
            start = time.perf_counter()
            yield
            self.spans.setdefault(name, []).append(time.perf_counter() - start)

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.part(name):
                return fn(*args, **kwargs)
        return timed

    def seconds(self, name: str) -> float:
        spans = self.spans.get(name, [])
        if self.cuda:
            torch.cuda.synchronize()
            return sum(s.elapsed_time(e) for s, e in spans) / 1000.0
        return sum(spans)


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


# ---------------------------------------------------------------- loaders


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


# ---------------------------------------------------------------- one measurement


def measure(cfg: Config, info: dist.DistInfo, device: torch.device, steps: int, warmup: int,
            loader_delay: float = 0.0, trace_path: Path | None = None) -> dict:
    """The three figures of `cfg` on this rank, gathered over ranks: a dict with RUN_KEYS
    (less sweep_value, config and knobs, added by `profile`). Rates in source images/sec."""
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
        loader_rate = _rate(lambda: next(batches), batch, steps, warmup, device)

    # 2. model only, on views already on the device
    plan = RunPlan.of(cfg, len(loader))
    c = build_components(cfg, device, info, plan.peak_lr)
    c.model.train()
    k = 0

    def step(view1: torch.Tensor, view2: torch.Tensor) -> None:
        nonlocal k  # the run's schedules, so lr and tau take the values of a real run (clipped past its end)
        train_step(c, view1, view2, plan.lr(k), plan.tau(k))
        k += 1

    views = random_batch(batch, crop, device, seed=cfg.train.seed, rank=info.rank)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model_rate = _rate(lambda: step(views.view1, views.view2), batch, steps, warmup, device)
    peak = float(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else math.nan
    share = _optimizer_ema_share(c, lambda: step(views.view1, views.view2), device, min(SHARE_STEPS, steps))
    del views

    # 3. end to end
    with contextlib.closing(_endless(loader)) as batches:
        def fed() -> None:
            b = next(batches)
            step(b.view1, b.view2)

        e2e_rate = _rate(fed, batch, steps, warmup, device)
        traced = None
        if trace_path is not None:
            traced = _trace(fed, device, trace_path)

    rows = dist.gather_floats([loader_rate, model_rate, e2e_rate, peak, share], device)
    loader_r, model_r, e2e_r, peak_r, share_r = (list(col) for col in zip(*rows))
    figures = {name: {"images_per_sec": sum(r), "per_rank": r} for name, r in zip(FIGURES, (loader_r, model_r, e2e_r))}
    total = {name: f["images_per_sec"] for name, f in figures.items()}
    word, evidence = verdict(total["loader"], total["model"], total["end_to_end"])
    del c, loader
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "batch_per_rank": batch, "crop_size": crop, **figures,
        "end_to_end_over_model": total["end_to_end"] / total["model"],
        "loader_over_model": total["loader"] / total["model"],
        "peak_memory_bytes": None if device.type != "cuda" else [int(p) for p in peak_r],
        "optimizer_ema_share": sum(share_r) / len(share_r),
        "verdict": word, "evidence": evidence,
        "trace": str(traced) if traced is not None else None,
    }


def _optimizer_ema_share(c: Any, step: Callable[[], None], device: torch.device, n: int) -> float:
    """Fraction of the step time spent in optimizer.step and ema.update, over `n` steps."""
    timer = _PartTimer(device)
    with _patched(c.optimizer, "step", timer.wrap("optimizer", c.optimizer.step)), \
            _patched(c.ema, "update", timer.wrap("ema", c.ema.update)):
        for _ in range(n):
            with timer.part("step"):
                step()
    whole = timer.seconds("step")
    return (timer.seconds("optimizer") + timer.seconds("ema")) / whole if whole > 0 else math.nan


def _trace(step: Callable[[], None], device: torch.device, path: Path) -> Path:
    """A torch.profiler Chrome/Perfetto trace of TRACE_STEPS calls of `step`, written to `path`."""
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(TRACE_STEPS):
            with record_function(f"end_to_end_step_{i}"):
                step()
        _now(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    return path


# ---------------------------------------------------------------- knobs


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


# ---------------------------------------------------------------- the machine


def _version(*names: str, prefix: str | None = None) -> str | None:
    """The installed version of the first distribution found (by name, or by name prefix)."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    if prefix:
        for d in importlib.metadata.distributions():
            if (d.metadata["Name"] or "").lower().startswith(prefix):
                return d.version
    return None


def machine_info(device: torch.device) -> dict:
    """What the figures depend on: GPU (or "cpu"), CPU count and library versions (None if absent)."""
    cuda = device.type == "cuda"
    return {
        "gpu": torch.cuda.get_device_name(device) if cuda else "cpu",
        "gpu_memory_bytes": torch.cuda.get_device_properties(device).total_memory if cuda else None,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dali": _version(prefix="nvidia-dali"),
        "ffcv": _version("ffcv"),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# ---------------------------------------------------------------- the command


def parse_sweep(text: str) -> tuple[str, list[str]]:
    """'data.batch_size=64,128' -> ('data.batch_size', ['64', '128'])."""
    key, _, values = text.partition("=")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not key or not items:
        raise ConfigError(f"--sweep {text!r}: expected KEY=v1,v2,..., e.g. data.batch_size=64,128")
    if key == "train.device":
        raise ConfigError("--sweep train.device: the device is chosen once per run; profile each device separately")
    return key, items


def profile(config: str | Path | None, overrides: list[str] = (), steps: int = 50, warmup: int = 10,
            sweep: str | None = None, loader_delay: float = 0.0, trace_dir: str | Path | None = None) -> dict:
    """Measure `config` (once, or once per sweep value) on this process's device; the JSON report.

    Joins the process group under torchrun / SLURM; every rank returns the same report.
    """
    if steps < 1 or warmup < 0:
        raise ConfigError(f"--steps {steps} --warmup {warmup}: expected steps >= 1 and warmup >= 0")
    if loader_delay < 0:
        raise ConfigError(f"--loader-delay {loader_delay}: expected seconds >= 0")
    world = dist.launcher_env().world_size
    base = load_config(config, list(overrides), world_size=world)
    key, values = parse_sweep(sweep) if sweep else (None, [None])
    # every sweep config is loaded (and validated) before the first measurement
    configs = [base if v is None else load_config(config, [*overrides, f"{key}={v}"], world_size=world)
               for v in values]
    if warmup == 0 and any(cfg.model.compile for cfg in configs):
        raise ConfigError("--warmup 0 with model.compile = true would time the compilation: use --warmup 2 or more")
    info, device = dist.init(base.train.device)
    try:
        runs = []
        for i, (value, cfg) in enumerate(zip(values, configs)):
            trace = None
            if trace_dir is not None:
                tag = f"_{key}={value}" if key else ""
                trace = Path(trace_dir) / f"profile_trace{tag}_rank{info.rank}.json"
            run = measure(cfg, info, device, steps, warmup, loader_delay, trace)
            peak = max(run["peak_memory_bytes"]) if run["peak_memory_bytes"] else None
            run.update(sweep_value=value, config=to_dict(cfg),
                       knobs=knobs(cfg, run["verdict"], info.world_size, peak, device))
            runs.append(run)
        return {"machine": machine_info(device), "config": to_dict(base), "world_size": info.world_size,
                "device": str(device), "steps": steps, "warmup": warmup, "loader_delay_s": loader_delay,
                "sweep_key": key, "runs": runs}
    finally:
        dist.shutdown()


def print_report(report: dict, title: str) -> None:
    """The rich tables: three figures, ratio, verdict with evidence and knobs (or one row per sweep value)."""
    from rich.console import Console
    from rich.table import Table

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


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `fastbyol profile` (and tools/profile_throughput.py)."""
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="a.b.c=value overrides of config keys")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per measurement (default 50)")
    parser.add_argument("--warmup", type=int, default=10,
                        help="untimed steps before each measurement: warm-up, cudnn autotune, compilation (default 10)")
    parser.add_argument("--json", metavar="OUT",
                        help="write every figure, the machine and the config to this JSON file")
    parser.add_argument("--trace", metavar="DIR",
                        help=f"write a torch.profiler Chrome/Perfetto trace of {TRACE_STEPS} end-to-end steps into DIR")
    parser.add_argument("--sweep", metavar="KEY=v1,v2",
                        help="measure once per value of one config key, one row per value "
                             "(e.g. data.batch_size=64,128; values may not contain commas)")
    parser.add_argument("--loader-delay", type=float, default=0.0, metavar="SECONDS",
                        help="diagnostic: sleep this long before each loader batch (simulates a slow loader)")


def run_profile(args: argparse.Namespace) -> int:
    """`fastbyol profile`: measure, print the tables on rank 0, write --json; returns 0."""
    report = profile(args.config, args.overrides, args.steps, args.warmup, args.sweep, args.loader_delay, args.trace)
    if dist.launcher_env().is_main:
        print_report(report, f"fastbyol profile {args.config}")
        if args.json:
            path = Path(args.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2, default=str))
    return 0


__all__ = ["VERDICTS", "DelayedLoader", "JSON_KEYS", "MACHINE_KEYS", "RUN_KEYS", "add_profile_arguments", "knobs",
           "machine_info", "measure", "parse_sweep", "print_report", "profile", "run_profile"]
