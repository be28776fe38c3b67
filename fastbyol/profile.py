"""`fastbyol profile CONFIG`: where do the images/sec go? The command and its arguments.

For one config (or one per value of a swept key): the three figures of fastbyol/throughput.py
(loader only, model only, end to end, in source images/sec), the verdict on them by the rules of
fastbyol/verdict.py, the knobs that would help (fastbyol/profile_report.py) and the machine they
were measured on (fastbyol/machine.py). Nothing is written to the config's run_dir: `train()` is
never called. Rank 0 prints the tables and writes --json.

`--json OUT` writes (keys documented here and in JSON_KEYS / RUN_KEYS / fastbyol.machine.MACHINE_KEYS):
    machine: gpu (name or "cpu"), gpu_memory_bytes, cpu_count, torch, cuda, cudnn, dali, ffcv, python,
             platform (versions are None when the package is absent), packages ({} here)
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
from pathlib import Path

from fastbyol import dist
from fastbyol.atomic import atomic_write_json
from fastbyol.config import ConfigError, load_config, to_dict
from fastbyol.machine import machine_info
from fastbyol.profile_report import knobs, print_report
from fastbyol.throughput import TRACE_STEPS, measure
from fastbyol.verdict import verdict

JSON_KEYS = ("machine", "config", "world_size", "device", "steps", "warmup", "loader_delay_s", "sweep_key", "runs")
RUN_KEYS = ("sweep_value", "batch_per_rank", "crop_size", "config", "loader", "model", "end_to_end",
            "end_to_end_over_model", "loader_over_model", "peak_memory_bytes", "optimizer_ema_share",
            "verdict", "evidence", "knobs", "trace")


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
        for value, cfg in zip(values, configs):
            trace = None
            if trace_dir is not None:
                tag = f"_{key}={value}" if key else ""
                trace = Path(trace_dir) / f"profile_trace{tag}_rank{info.rank}.json"
            figures = measure(cfg, info, device, steps, warmup, loader_delay, trace)
            word, evidence = verdict(*(figures[k]["images_per_sec"] for k in ("loader", "model", "end_to_end")))
            peak = max(figures["peak_memory_bytes"]) if figures["peak_memory_bytes"] else None
            run = {**figures, "sweep_value": value, "config": to_dict(cfg), "verdict": word, "evidence": evidence,
                   "knobs": knobs(cfg, word, info.world_size, peak, device)}
            runs.append({k: run[k] for k in RUN_KEYS})
        return {"machine": machine_info(device), "config": to_dict(base), "world_size": info.world_size,
                "device": str(device), "steps": steps, "warmup": warmup, "loader_delay_s": loader_delay,
                "sweep_key": key, "runs": runs}
    finally:
        dist.shutdown()


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
    """`fastbyol profile`: measure, print the tables on rank 0, write --json (atomically); returns 0."""
    report = profile(args.config, args.overrides, args.steps, args.warmup, args.sweep, args.loader_delay, args.trace)
    if dist.launcher_env().is_main:
        print_report(report, f"fastbyol profile {args.config}")
        if args.json:
            atomic_write_json(report, args.json, default=str)
    return 0


__all__ = ["JSON_KEYS", "RUN_KEYS", "add_profile_arguments", "parse_sweep", "profile", "run_profile"]
