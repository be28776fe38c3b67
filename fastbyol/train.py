"""The BYOL training loop: read it top to bottom.

`_train` is the story: find the data, open the run directory (fresh or resumed), build the model,
then one flat loop of steps; after each step `due` decides, in one place, whether to log, run the
kNN monitor, write a checkpoint or stop. The step itself (model, LARS, EMA) is fastbyol/step.py;
the run directory's rules are fastbyol/rundir.py.

Per step: lr_k and tau_k from the schedules (pure functions of the step), one BYOL forward and
backward under autocast, a LARS step, a target EMA update. Metrics stay on the device and are read
every `logging.log_every` steps, so the step itself never waits for the host.

Resume is exact: model init, data order, crops and augmentations are functions of (seed, epoch,
step), so a run resumed from a checkpoint sees the same batches and reaches the same parameters
as an uninterrupted one.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

import pipelines
from fastbyol import checkpoint, dist, rundir
from fastbyol.config import Config, to_dict
from fastbyol.export import online_encoder_state
from fastbyol.knn import KNNMonitor
from fastbyol.metrics import MetricWindow, RunMonitor, plot_metrics, time_figures
from fastbyol.optim import RunPlan
from fastbyol.step import Components, build_components, build_model, initial_encoder, restore, train_step, training_state
from fastbyol.tensorboard_log import require_tensorboard
from fastbyol.utilization import peak_flops, step_flops_per_image
from fastbyol.verdict import verdict
from fastbyol.views import batch_picture, write_png


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was written and the run can be resumed."""


class Diverged(Exception):
    """The loss or the weights stopped being finite; the message names the step and the newest
    finite checkpoint, which is kept (a checkpoint of non-finite weights is never written, so
    rotation never deletes the last good one)."""


# fp16: below this loss scale the grad scaler has skipped step after step (fairseq's --min-loss-scale)
MIN_LOSS_SCALE = 1e-4


def train(cfg: Config, force: bool = False, step_hook: Callable[[int], None] | None = None) -> dict:
    """Run (or resume) the training of `cfg` (a Config from load_config: validated there, once);
    returns a summary dict (steps, final loss, images/sec, where the time went, kNN).

    `step_hook(step)` is called after every training step, before the loop decides what follows
    it (tests use it to interrupt a run).
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


def _train(cfg: Config, info: dist.DistInfo, device: torch.device, force: bool,
           step_hook: Callable[[int], None] | None) -> dict:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    # the data first: a missing backend or data path fails before the run directory is touched
    if cfg.data.demo and not Path(cfg.data.path).exists():
        _say(cfg, info, f"writing the demo image set to {Path(cfg.data.path).parent} (first use only) ...")
    loader = pipelines.build_loader(cfg.data, cfg.augment, device, info.rank, info.world_size, cfg.train.seed)
    plan = RunPlan.of(cfg, len(loader))
    if cfg.logging.tensorboard:
        require_tensorboard()

    run = rundir.open_run(cfg, plan.total_steps, force, info, map_location=device)
    try:
        return _run(cfg, info, device, loader, plan, run, step_hook)
    finally:
        run.release()  # the run directory's lock (the OS releases it too, however the process ends)


def _run(cfg: Config, info: dist.DistInfo, device: torch.device, loader: pipelines.TwoViewLoader, plan: RunPlan,
         run: rundir.RunStart, step_hook: Callable[[int], None] | None) -> dict:
    """Train the opened run from run.step to the plan's end (nothing to do for a complete run)."""
    if run.complete:
        return {"steps": run.step, "total_steps": plan.total_steps, "already_complete": True,
                "run_dir": str(run.run_dir), "notes": run.messages}

    c = build_components(cfg, device, info, plan.peak_lr)
    if run.state is not None:
        restore(c, run.state)
    _say(cfg, info, f"training ResNet-{cfg.model.depth} ({sum(p.numel() for p in c.byol.online_parameters()) / 1e6:.1f}M "
         f"parameters with the heads) on {device.type}: {plan.total_steps} steps of {cfg.data.batch_size} images "
         f"from {cfg.data.path}")

    step = start_step = run.step
    knn = KNNHook(cfg, plan)
    window = MetricWindow(device, loader.batch_size * info.world_size, info.world_size,
                          step_flops_per_image(cfg, build_model), peak_flops(device, cfg.train.precision),
                          first_step=step)
    record: dict = {}
    knn_end: dict = {}
    c.model.train()
    start_time = time.perf_counter()
    with RunMonitor(run.run_dir, plan.total_steps, cfg.logging.progress, enabled=info.is_main,
                    first_step=step, tensorboard=cfg.logging.tensorboard) as monitor:
        for text in run.messages:
            monitor.message(text)
        with StopFlag() as stop:
            for batch in window.batches(_batches(loader, plan, step)):
                epoch, lr, tau = plan.epoch(step), plan.lr(step), plan.tau(step)
                if step == start_step and info.is_main:
                    _write_views(cfg, loader, batch, plan, step, run.run_dir, monitor)
                out = train_step(c, batch.view1, batch.view2, lr, tau, plan.held_lr(step))
                window.add(out.loss, out.cosine, out.collapse_std)
                step += 1
                if step_hook is not None:
                    step_hook(step)
                now = due(step, cfg, plan, knn, stop, info, device)
                if now.log:
                    skipped = c.skipped_steps if c.scaler is not None else None
                    record = {"step": step, "epoch": epoch, **window.flush(step, skipped), "lr": lr, "tau": tau,
                              "time": time.time()}
                    diverged = _diverged_loss(c, window, step)  # where the loss is read anyway: no extra sync
                    if diverged:
                        monitor.log(record)
                        raise _diverged(diverged, run.run_dir)
                    if now.knn:
                        record.update(knn(c.byol.online_encoder, monitor, step))
                        window.pause(step)  # the evaluation's pause is not training throughput
                    monitor.log(record)
                if now.checkpoint:
                    _save(c, cfg, plan, info, run.run_dir, step)
                if now.stop:
                    monitor.message(f"stopped by signal {stop.raised} at step {step}; checkpoint written, "
                                    f"run the same command again to resume")
                    raise Interrupted(f"interrupted at step {step}")
        _save(c, cfg, plan, info, run.run_dir, step)
        if knn.monitor is not None:
            knn_end = knn.side_by_side(c.byol.online_encoder, initial_encoder(cfg, device), record, monitor, step)

    elapsed = time.perf_counter() - start_time
    images_per_step = loader.batch_size * info.world_size
    summary = {"steps": step, "final_loss": record.get("loss"), "images_per_sec": record.get("images_per_sec"),
               "mean_images_per_sec": (step - start_step) * images_per_step / elapsed if elapsed > 0 else None,
               "wall_time_s": elapsed, "run_dir": str(run.run_dir), "total_steps": plan.total_steps,
               "already_complete": False, "knn": knn_end, **where_time_went(window, record)}
    if info.is_main:
        checkpoint.atomic_save(online_encoder_state(c.byol.state_dict()), run.run_dir / "encoder.pt")
        if cfg.logging.plot and (run.run_dir / "metrics.jsonl").exists():
            plot_metrics(run.run_dir / "metrics.jsonl", run.run_dir / "metrics.png")
    return summary


# ---------------------------------------------------------------- the loop's parts


@dataclass(frozen=True)
class Due:
    """What follows a step: a log line (with the kNN monitor when `knn`), a checkpoint, a stop."""

    log: bool
    knn: bool
    checkpoint: bool
    stop: bool


def due(step: int, cfg: Config, plan: RunPlan, knn: KNNHook, stop: StopFlag, info: dist.DistInfo,
        device: torch.device) -> Due:
    """The one place that decides what follows `step` (steps done): log every logging.log_every steps,
    at the last step and with every kNN evaluation; checkpoint every train.checkpoint_every steps
    (the last step's checkpoint is written after the loop) and when stopping; stop on a signal
    (distributed: agreed at log steps only, see `should_stop`)."""
    at_log = step % cfg.logging.log_every == 0
    at_knn = knn.due(step)
    stopping = should_stop(stop, info, at_log, device)
    periodic = step % cfg.train.checkpoint_every == 0 and step < plan.total_steps
    return Due(log=at_log or at_knn or step == plan.total_steps, knn=at_knn, checkpoint=periodic or stopping,
               stop=stopping)


def _batches(loader: pipelines.TwoViewLoader, plan: RunPlan, step: int) -> Iterator[pipelines.Batch]:
    """The run's batches from `step` (steps done) to plan.total_steps, epoch after epoch; a resumed
    run starts mid-epoch, at the batch it would have seen next."""
    while step < plan.total_steps:
        for batch in loader.epoch(plan.epoch(step), start_step=step % plan.steps_per_epoch):
            yield batch
            step += 1
            if step >= plan.total_steps:
                return


def _write_views(cfg: Config, loader: pipelines.TwoViewLoader, batch: pipelines.Batch, plan: RunPlan, step: int,
                 run_dir: Path, monitor: RunMonitor) -> None:
    """views.png from the run's first batch (fastbyol/views.py): what the pipeline feeds the model."""
    picture = batch_picture(loader, batch, plan.epoch(step), step % plan.steps_per_epoch, cfg.augment.mean,
                            cfg.augment.std)
    write_png(picture, run_dir / "views.png")
    monitor.picture("views", picture, step)


def _diverged_loss(c: Components, window: MetricWindow, step: int) -> str | None:
    """What shows, at a log step, that the run diverged (None if nothing): a loss that is not finite
    (bf16, fp32), or an fp16 loss scale under MIN_LOSS_SCALE (the scaler skips the steps whose
    gradients are not finite, so a non-finite loss alone is a skipped step there)."""
    if c.scaler is None:
        return None if window.nonfinite_step is None else f"the loss is not finite from step {window.nonfinite_step}"
    scale = c.scaler.get_scale()
    if scale < MIN_LOSS_SCALE:
        return (f"the fp16 loss scale fell to {scale:.3g} by step {step}: the grad scaler skipped step after step "
                "(gradients not finite)")
    return None


def _nonfinite_weights(c: Components, step: int) -> str | None:
    """Which weights (model state) are not finite after `step`, or None: one host read."""
    state = {k: v for k, v in c.byol.state_dict().items() if v.is_floating_point()}
    if bool(torch.stack([torch.isfinite(v).all() for v in state.values()]).all()):
        return None
    bad = [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
    return f"the weights are not finite after step {step} ({len(bad)} tensor(s), e.g. {bad[0]})"


def _diverged(what: str, run_dir: Path) -> Diverged:
    kept = checkpoint.list_checkpoints(run_dir)
    where = f"the newest finite checkpoint is {kept[-1]} (kept)" if kept else "no finite checkpoint was written before it"
    return Diverged(f"diverged: {what}; {where}; lower optim.base_lr (or optim.lr) and start again with --force")


def _save(c: Components, cfg: Config, plan: RunPlan, info: dist.DistInfo, run_dir: Path, step: int) -> None:
    """The checkpoint of `step` (rank 0 writes, keeping train.keep_checkpoints); every rank waits for it.
    Weights that are not finite are never written (Diverged): rotation never deletes the last good
    checkpoint. The check reads the device once per checkpoint, which writes them to the host anyway."""
    diverged = _nonfinite_weights(c, step)  # every rank: their weights are the same
    if diverged:
        raise _diverged(diverged, run_dir)
    if info.is_main:
        checkpoint.save_checkpoint({**training_state(c), "step": step, "epoch": plan.epoch(step),
                                    "config": to_dict(cfg), "world_size": info.world_size},
                                   run_dir, step, cfg.train.keep_checkpoints)
    dist.barrier()


def _say(cfg: Config, info: dist.DistInfo, text: str) -> None:
    """What happens before the first step (data, model): one line on stderr, on rank 0."""
    if info.is_main and cfg.logging.progress != "none":
        print(text, file=sys.stderr, flush=True)


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


def should_stop(stop: StopFlag, info: dist.DistInfo, at_log_step: bool, device: torch.device) -> bool:
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
        fresh = "knn_top1" not in last
        now = self.monitor(trained) if fresh else last
        before = self.monitor(untrained)
        # metrics.jsonl gets the trained figures too when the last epoch was not evaluated: its last
        # knn_top1 is then always the final encoder's, as the summary prints
        monitor.note({"step": step, **(now if fresh else {}), "knn_random_init_top1": before["knn_top1"],
                      "knn_random_init_top5": before["knn_top5"]})
        return {"trained_top1": now["knn_top1"], "trained_top5": now["knn_top5"],
                "random_init_top1": before["knn_top1"], "random_init_top5": before["knn_top5"]}


# ---------------------------------------------------------------- the summary


def where_time_went(window: MetricWindow, last: dict) -> dict:
    """The run's time figures for the summary: loader wait share and step time over every logged
    window, the last record's MFU and peak memory, and the profiler's verdict on them.

    Only end-to-end time is observed during training, so the profiler's three rates are
    estimated from it: loader = images / loader wait, model = images / (wall − wait),
    end-to-end = images / wall. For a loader that works in the loop (no prefetch) these are its
    rates; a prefetching loader hides part of its work, so the loader rate is an upper bound,
    and end-to-end / model (= 1 − wait share) still says how much the pipeline costs.
    """
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


__all__ = ["Diverged", "Due", "Interrupted", "KNNHook", "StopFlag", "due", "should_stop", "summary_lines", "train",
           "where_time_went"]
