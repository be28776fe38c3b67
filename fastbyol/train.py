"""The BYOL training loop: read it top to bottom.

Per step: lr_k and tau_k from the schedules (pure functions of the step), one BYOL forward and
backward under autocast, a LARS step, a target EMA update. Metrics stay on the device and are read
every `logging.log_every` steps, so the step itself never waits for the host.

Resume is exact: model init, data order, crops and augmentations are functions of (seed, epoch,
step), so a run resumed from a checkpoint sees the same batches and reaches the same parameters
as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import pipelines
from fastbyol import checkpoint, dist, rundir
from fastbyol.byol import BYOL, BYOLOutput, param_groups
from fastbyol.config import Config, to_dict
from fastbyol.ema import TargetEMA
from fastbyol.knn import KNNMonitor
from fastbyol.export import online_encoder_state
from fastbyol.metrics import MetricWindow, RunMonitor, plot_metrics, time_figures
from fastbyol.models.resnet import resnet
from fastbyol.models.sync_batchnorm import convert_sync_batchnorm
from fastbyol.optim import LARS, RunPlan
from fastbyol.utilization import peak_flops, step_flops_per_image

class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was written and the run can be resumed."""


@dataclass
class Components:
    """What one training step needs; `model` may be DDP-wrapped, `byol` is the plain module."""

    model: nn.Module
    byol: BYOL
    optimizer: LARS
    ema: TargetEMA
    scaler: torch.amp.GradScaler | None
    autocast: Callable[[], contextlib.AbstractContextManager]


def build_model(cfg: Config) -> BYOL:
    """The BYOL module of the config, on the CPU, parameters initialised from the global torch RNG."""
    encoder = resnet(cfg.model.depth, cfg.model.width, cfg.model.stem, cfg.model.zero_init_residual)
    return BYOL(encoder, encoder.num_features, cfg.byol.hidden_dim, cfg.byol.proj_dim, cfg.byol.concat_views)


def initial_encoder(cfg: Config, device: torch.device) -> nn.Module:
    """The online encoder exactly as build_components initialises it (train.seed), untrained: the
    baseline a run's kNN accuracy is compared with. The global RNG state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        encoder = build_model(cfg).online_encoder.to(device)
    return encoder.to(memory_format=torch.channels_last) if cfg.model.channels_last else encoder


def build_components(cfg: Config, device: torch.device, info: dist.DistInfo, peak_lr: float) -> Components:
    """Model (DDP-wrapped when distributed), LARS, target EMA, grad scaler and autocast of the config."""
    torch.manual_seed(cfg.train.seed)
    byol = build_model(cfg)
    if info.enabled and cfg.dist.sync_bn and cfg.dist.sync_bn_group_size != 1:  # torch's SyncBatchNorm on CUDA, gloo all-reduce on CPU
        byol = convert_sync_batchnorm(byol, device, dist.rank_groups(cfg.dist.sync_bn_group_size))
    byol = byol.to(device)
    if cfg.model.channels_last:
        byol = byol.to(memory_format=torch.channels_last)
    optimizer = LARS(param_groups(byol, cfg.optim.weight_decay), lr=peak_lr, momentum=cfg.optim.momentum,
                     eta=cfg.optim.eta)
    ema = TargetEMA(byol.online_network(), byol.target_network())
    model: nn.Module = byol
    if cfg.model.compile:
        model.compile(mode=cfg.model.compile_mode)
    if info.enabled:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            bucket_cap_mb=cfg.dist.bucket_cap_mb, static_graph=cfg.dist.static_graph,
            gradient_as_bucket_view=cfg.dist.gradient_as_bucket_view)
    precision = cfg.train.precision
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def autocast() -> contextlib.AbstractContextManager:
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    return Components(model, byol, optimizer, ema, scaler, autocast)


def train_step(c: Components, view1: torch.Tensor, view2: torch.Tensor, lr: float, tau: float) -> BYOLOutput:
    """One BYOL step: forward + backward of the symmetric loss, LARS at `lr`, EMA at `tau`."""
    for group in c.optimizer.param_groups:
        group["lr"] = lr
    with c.autocast():
        out = c.model(view1, view2)
    if c.scaler is not None:
        c.scaler.scale(out.loss).backward()
        c.scaler.step(c.optimizer)
        c.scaler.update()
    else:
        out.loss.backward()
        c.optimizer.step()
    c.optimizer.zero_grad(set_to_none=True)
    c.ema.update(tau)
    return out


class StopFlag:
    """Set by SIGINT/SIGTERM; the loop checkpoints and stops at the next step boundary."""

    def __init__(self) -> None:
        self.raised: int | None = None
        self.previous = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.raised is not None:  # a second Ctrl-C: the user really wants out now
            signal.signal(signum, self.previous[signum])
            raise KeyboardInterrupt
        self.raised = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(cfg: Config, force: bool = False, step_hook: Callable[[int], None] | None = None) -> dict:
    """Run (or resume) the training of `cfg`; returns a summary dict (steps, final loss, images/sec).

    `step_hook(step)` is called after every step (tests use it to interrupt a run).
    """
    info, device = dist.init(cfg.train.device, cfg.dist.timeout_s)
    try:
        return _train(cfg, info, device, force, step_hook)
    except RuntimeError as e:
        if not dist.is_collective_failure(e):
            raise
        where = (f"the newest checkpoint in {cfg.train.run_dir} is whole: run the same command again to resume "
                 f"from it")
        raise dist.name_lost_ranks(e, min(10.0, cfg.dist.timeout_s), where) from e
    finally:
        dist.shutdown()


class KNNHook:
    """The kNN monitor at the end of every `eval.knn_every`-th epoch (never when it is 0)."""

    def __init__(self, cfg: Config, plan: RunPlan) -> None:
        self.every, self.plan = cfg.eval.knn_every, plan
        self.monitor = KNNMonitor.from_config(cfg) if self.every else None

    def due(self, step: int) -> bool:
        """Whether `step` steps complete an epoch that is evaluated."""
        spe = self.plan.steps_per_epoch
        return self.monitor is not None and step % spe == 0 and (step // spe) % self.every == 0

    def __call__(self, encoder: nn.Module, monitor: RunMonitor, step: int) -> dict[str, float]:
        """{"knn_top1", "knn_top5"} of `encoder`; on every rank (each encodes its share of the images)."""
        result = self.monitor(encoder)
        if monitor.mode == "rich":  # plain lines show the record's knn_* keys already
            monitor.message(f"epoch {self.plan.epoch(step)}: kNN top-1 {result['knn_top1']:.2f}%"
                            f"  top-5 {result['knn_top5']:.2f}%")
        return result

    def side_by_side(self, trained: nn.Module, untrained: nn.Module, last: dict, monitor: RunMonitor,
                     step: int) -> dict[str, float]:
        """The run's end: kNN of the trained encoder next to the same encoder untrained (did the
        pretraining learn?); the trained figures are `last`'s when the last step was evaluated."""
        now = last if "knn_top1" in last else self.monitor(trained)
        before = self.monitor(untrained)
        monitor.note({"step": step, "knn_random_init_top1": before["knn_top1"],
                      "knn_random_init_top5": before["knn_top5"]})
        return {"trained_top1": now["knn_top1"], "trained_top5": now["knn_top5"],
                "random_init_top1": before["knn_top1"], "random_init_top5": before["knn_top5"]}


def _restore(c: Components, state: dict) -> None:
    """Model, optimizer and grad-scaler state of a checkpoint into the components."""
    c.byol.load_state_dict(state["model"])
    c.optimizer.load_state_dict(state["optimizer"])
    if c.scaler is not None and state.get("scaler"):
        c.scaler.load_state_dict(state["scaler"])


def _train(cfg: Config, info: dist.DistInfo, device: torch.device, force: bool,
           step_hook: Callable[[int], None] | None) -> dict:
    cfg.validate(info.world_size)
    rundir.absolute_paths(cfg)
    run_dir = Path(cfg.train.run_dir)
    fresh = rundir.decide_fresh(cfg, run_dir, force, info)  # nothing is written before data and checkpoint are good
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark

    def say(text: str) -> None:  # what happens before the first step (data, model), on rank 0
        if info.is_main and cfg.logging.progress != "none":
            print(text, file=sys.stderr, flush=True)

    if cfg.data.demo and not Path(cfg.data.path).exists():
        say(f"writing the demo image set to {Path(cfg.data.path).parent} (first use only) ...")
    loader = pipelines.build_loader(cfg.data, cfg.augment, device, info.rank, info.world_size, cfg.train.seed)
    plan = RunPlan.of(cfg, len(loader))
    c = build_components(cfg, device, info, plan.peak_lr)
    say(f"training ResNet-{cfg.model.depth} ({sum(p.numel() for p in c.byol.online_parameters()) / 1e6:.1f}M "
        f"parameters with the heads) on {device.type}: {plan.total_steps} steps of {cfg.data.batch_size} images "
        f"from {cfg.data.path}")

    state = None if fresh else rundir.load_agreed_checkpoint(cfg, run_dir, info, map_location=device)
    step = 0 if state is None else state["step"]
    if step >= plan.total_steps:  # a finished run: report it; only finish what a kill cut short
        notes = rundir.finish_complete(run_dir, state) if info.is_main else []
        return {"steps": step, "total_steps": plan.total_steps, "already_complete": True, "run_dir": str(run_dir),
                "notes": notes}
    if state is not None:
        _restore(c, state)
    messages = rundir.begin(cfg, run_dir, fresh, step) if info.is_main else []
    dist.barrier()

    monitor = RunMonitor(run_dir, plan.total_steps, cfg.logging.progress, enabled=info.is_main, first_step=step)
    for text in messages:
        monitor.message(text)
    if state is not None:
        monitor.message(f"resumed from {state['path']} at step {step}")
    knn = KNNHook(cfg, plan)
    knn_end: dict = {}
    images_per_step = loader.batch_size * info.world_size
    window = MetricWindow(device, images_per_step, info.world_size, step_flops_per_image(cfg),
                          peak_flops(device, cfg.train.precision), first_step=step)
    record: dict = {}

    def save() -> None:
        if info.is_main:
            checkpoint.save_checkpoint({
                "model": c.byol.state_dict(), "optimizer": c.optimizer.state_dict(),
                "scaler": c.scaler.state_dict() if c.scaler is not None else None,
                "step": step, "epoch": plan.epoch(step), "config": to_dict(cfg),
                "world_size": info.world_size,
            }, run_dir, step, cfg.train.keep_checkpoints)
        dist.barrier()

    c.model.train()
    start_time = time.perf_counter()
    start_step = step
    try:
        with StopFlag() as stop:
            while step < plan.total_steps:
                epoch = plan.epoch(step)
                for batch in window.batches(loader.epoch(epoch, start_step=step % plan.steps_per_epoch)):
                    lr, tau = plan.lr(step), plan.tau(step)
                    out = train_step(c, batch.view1, batch.view2, lr, tau)
                    window.add(out.loss, out.cosine, out.collapse_std)
                    step += 1
                    at_knn = knn.due(step)
                    if step % cfg.logging.log_every == 0 or step == plan.total_steps or at_knn:
                        record = {"step": step, "epoch": epoch, **window.flush(step), "lr": lr, "tau": tau,
                                  "time": time.time()}
                        if at_knn:
                            record.update(knn(c.byol.online_encoder, monitor, step))
                            window.pause(step)  # the evaluation's pause is not training throughput
                        monitor.log(record)
                    if step % cfg.train.checkpoint_every == 0 and step < plan.total_steps:
                        save()
                    if step_hook is not None:
                        step_hook(step)
                    if _should_stop(stop, info, step % cfg.logging.log_every == 0, device):
                        save()
                        monitor.message(f"stopped by signal {stop.raised} at step {step}; checkpoint written, "
                                        f"run the same command again to resume")
                        raise Interrupted(f"interrupted at step {step}")
                    if step >= plan.total_steps:
                        break
        save()
        if knn.monitor is not None:
            knn_end = knn.side_by_side(c.byol.online_encoder, initial_encoder(cfg, device), record, monitor, step)
    finally:
        monitor.close()

    elapsed = time.perf_counter() - start_time
    summary = {"steps": step, "final_loss": record.get("loss"), "images_per_sec": record.get("images_per_sec"),
               "mean_images_per_sec": (step - start_step) * images_per_step / elapsed if elapsed > 0 else None,
               "wall_time_s": elapsed, "run_dir": str(run_dir), "total_steps": plan.total_steps, "already_complete": False,
               "knn": knn_end, **_where_time_went(window, record)}
    if info.is_main:
        checkpoint.atomic_save(online_encoder_state(c.byol.state_dict()), run_dir / "encoder.pt")
        if cfg.logging.plot and (run_dir / "metrics.jsonl").exists():
            plot_metrics(run_dir / "metrics.jsonl", run_dir / "metrics.png")
    return summary


def _where_time_went(window: MetricWindow, last: dict) -> dict:
    """The run's time figures for the summary: loader wait share and step time over every logged
    window, the last record's MFU and peak memory, and the profiler's verdict on them.

    Only end-to-end time is observed during training, so the profiler's three rates are
    estimated from it: loader = images / loader wait, model = images / (wall − wait),
    end-to-end = images / wall. For a loader that works in the loop (no prefetch) these are its
    rates; a prefetching loader hides part of its work, so the loader rate is an upper bound,
    and end-to-end / model (= 1 − wait share) still says how much the pipeline costs.
    """
    from fastbyol.profile import verdict

    t = window.total
    if not t["images"] or t["wall_s"] <= 0:
        return {}
    share = min(1.0, t["wait_s"] / t["wall_s"])
    work = max(t["wall_s"] - t["wait_s"], 1e-12)
    word, evidence = verdict(t["images"] / t["wait_s"] if t["wait_s"] > 0 else math.inf,
                             t["images"] / work, t["images"] / t["wall_s"])
    figures = {"loader_wait_share": share, "step_time_s": t["wall_s"] * window.images_per_step / t["images"],
               "mfu": last.get("mfu"), "verdict": word, "verdict_reason": evidence[-1]}
    if "peak_memory_gib" in last:
        figures["peak_memory_gib"] = last["peak_memory_gib"]
    return figures


def summary_lines(summary: dict) -> list[str]:
    """What `fastbyol train` prints at the end: totals, where the time went, and the verdict; or,
    for a run that was complete already, that nothing was done."""
    if summary.get("already_complete"):
        return [*summary["notes"],
                f"run directory {summary['run_dir']} holds a complete run ({summary['steps']} steps of "
                f"{summary['total_steps']}); nothing to do. Raise train.epochs (or train.max_steps) to continue it, "
                "or pass --no-resume to start afresh"]
    loss = "n/a" if summary["final_loss"] is None else f"{summary['final_loss']:.4f}"
    lines = [f"done: {summary['steps']} steps, final loss {loss}, "
             f"{summary['mean_images_per_sec'] or 0:.1f} images/sec, {summary['wall_time_s']:.0f} s; "
             f"run directory {summary['run_dir']}"]
    if "verdict" in summary:
        lines.append(f"time: {time_figures(summary)}")
        lines.append(f"verdict: {summary['verdict']} ({summary['verdict_reason']})")
    if summary.get("knn"):  # trained vs untrained, side by side: did the pretraining learn?
        k = summary["knn"]
        lines.append(f"kNN top-1 on the val images: trained {k['trained_top1']:.1f}%  vs  random init "
                     f"{k['random_init_top1']:.1f}%  (top-5: {k['trained_top5']:.1f}% vs {k['random_init_top5']:.1f}%)")
    return lines


def _should_stop(stop: StopFlag, info: dist.DistInfo, at_log_step: bool, device: torch.device) -> bool:
    """Whether to stop now. Distributed: agreed at log steps only, so all ranks stop at the same
    step and the other steps stay free of a host sync."""
    if not info.enabled:
        return stop.raised is not None
    if not at_log_step:
        return False
    agreed = dist.any_rank(stop.raised is not None, device)
    if agreed and stop.raised is None:
        stop.raised = signal.SIGTERM
    return agreed


__all__ = ["Components", "Interrupted", "build_components", "build_model", "train", "train_step"]
