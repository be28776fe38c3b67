"""The step layer: the BYOL model of a config, what one training step needs, and the step itself.

The loop (train.py), the profiler (profile.py) and the benchmarks build on this module; it knows
nothing of run directories, logging or schedules: `train_step` is given its lr and tau.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from fastbyol import dist
from fastbyol.byol import BYOL, BYOLOutput, param_groups
from fastbyol.config import Config
from fastbyol.ema import TargetEMA
from fastbyol.models.resnet import resnet
from fastbyol.models.sync_batchnorm import convert_sync_batchnorm
from fastbyol.optim import LARS

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # train.precision -> autocast dtype (fp32: none)
# DDP without the buffer sync before each forward (build_components says why): torch 2.13 names it
# forward_sync_buffers and deprecates broadcast_buffers, which older releases (2.11) alone know.
NO_FORWARD_BUFFER_SYNC = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})


@dataclass
class Components:
    """What one training step needs; `model` may be DDP-wrapped or compiled, `byol` is the plain module.
    `autocast_dtype` is None for fp32 (no autocast)."""

    model: nn.Module
    byol: BYOL
    optimizer: LARS
    ema: TargetEMA
    scaler: torch.amp.GradScaler | None
    device_type: str
    autocast_dtype: torch.dtype | None
    skipped_steps: int = 0  # fp16: steps whose update the grad scaler skipped (inf or NaN gradients)
    optimizer_steps: int = 0  # updates the optimizer made (counted by a step hook; fp16 only)

    def __post_init__(self) -> None:
        if self.scaler is not None:  # the scaler skips optimizer.step() silently: count the calls
            self.optimizer.register_step_post_hook(self._count_update)

    def _count_update(self, *_: object) -> None:
        self.optimizer_steps += 1

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward's autocast context of train.precision (a no-op for fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)


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
    """Model (compiled and DDP-wrapped as the config and launcher say), LARS at `peak_lr`, target EMA,
    grad scaler (fp16) and autocast of the config. Parameters initialised from train.seed."""
    torch.manual_seed(cfg.train.seed)
    byol = build_model(cfg)
    if info.enabled and cfg.dist.sync_bn and cfg.dist.sync_bn_group_size != 1:  # torch's SyncBatchNorm on CUDA, gloo all-reduce on CPU
        byol = convert_sync_batchnorm(byol, device, dist.rank_groups(cfg.dist.sync_bn_group_size))
    byol = byol.to(device)
    if cfg.model.channels_last:
        byol = byol.to(memory_format=torch.channels_last)
    groups = param_groups(byol, cfg.optim.weight_decay, cfg.optim.lars, cfg.optim.predictor_lr_scale,
                          cfg.optim.predictor_lr_hold)
    optimizer = LARS(groups, lr=peak_lr, momentum=cfg.optim.momentum, eta=cfg.optim.eta)
    ema = TargetEMA(byol.online_network(), byol.target_network())
    model: nn.Module = byol
    if cfg.model.compile:
        compile_networks(byol, cfg.model.compile_mode, cfg.model.compile_backend)
    if info.enabled:
        # No copy of rank 0's BatchNorm buffers to every rank before each forward. Training reads
        # none of them: online and target both run in train mode, on batch statistics. With
        # dist.sync_bn those statistics are the global batch's, so every rank's running mean / var
        # move identically anyway; without it each rank's follow its own batches, and rank 0's
        # evolve exactly as they did with the broadcast (it only ever sent rank 0's), so the
        # checkpoints, written by rank 0, are unchanged (the kNN monitor's share of the images on
        # another rank is then encoded with that rank's own statistics).
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, **NO_FORWARD_BUFFER_SYNC,
            bucket_cap_mb=cfg.dist.bucket_cap_mb, static_graph=cfg.dist.static_graph,
            gradient_as_bucket_view=cfg.dist.gradient_as_bucket_view)
    precision = cfg.train.precision
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return Components(model, byol, optimizer, ema, scaler, device.type, AUTOCAST_DTYPES.get(precision))


def compile_networks(byol: BYOL, mode: str, backend: str) -> None:
    """torch.compile the online network (encoder -> projector -> predictor) and the target network
    (encoder -> projector) of `byol`, each as its own function; the loss around them stays eager.

    Not one trace of the whole BYOL forward (four ResNet forwards and two backwards, minutes of
    cold compile): the online graph serves both views, the target's is forward-only, and a graph
    break (SyncBatchNorm's collectives) cuts one network's graph, not the whole step's. The
    networks' forward functions are compiled, not their modules: nn.Module.compile() on the heads
    (nn.Sequential, whose forward is torch's own code, which dynamo skips as a first frame)
    compiles nothing, and torch.compile(module) would rename every state_dict key (`_orig_mod.`).
    `mode` is inductor's (the config checks that); the other backends take none.
    """
    options = {"backend": backend, "mode": mode} if backend == "inductor" else {"backend": backend}
    byol._online = torch.compile(byol._online, **options)  # instance attributes, shadowing the methods
    byol._target = torch.compile(byol._target, **options)


def train_step(c: Components, view1: torch.Tensor, view2: torch.Tensor, lr: float, tau: float,
               held_lr: float | None = None) -> BYOLOutput:
    """One BYOL step: forward + backward of the symmetric loss, LARS at `lr`, EMA at `tau`.
    Groups marked "hold_lr" (optim.predictor_lr_hold) step at `held_lr` instead (RunPlan.held_lr:
    the schedule held at its peak after warm-up; None: `lr`). Each group's lr is then scaled by its
    "lr_scale". Views: float (B, 3, H, W) on the model's device. Reads no tensor on the host."""
    for group in c.optimizer.param_groups:
        scheduled = held_lr if held_lr is not None and group.get("hold_lr", False) else lr
        group["lr"] = scheduled * group.get("lr_scale", 1.0)
    with c.autocast():
        out = c.model(view1, view2)
    if c.scaler is not None:
        c.scaler.scale(out.loss).backward()
        updates = c.optimizer_steps
        c.scaler.step(c.optimizer)  # reads its inf/NaN flag on the host (PyTorch's one sync): skips or steps
        c.skipped_steps += c.optimizer_steps == updates
        c.scaler.update()
    else:
        out.loss.backward()
        c.optimizer.step()
    c.optimizer.zero_grad(set_to_none=True)
    c.ema.update(tau)
    return out


def training_state(c: Components) -> dict:
    """The step layer's part of a checkpoint: model, optimizer and grad-scaler state (None without fp16)."""
    return {"model": c.byol.state_dict(), "optimizer": c.optimizer.state_dict(),
            "scaler": c.scaler.state_dict() if c.scaler is not None else None}


def restore(c: Components, state: dict) -> None:
    """Model, optimizer and grad-scaler state of a checkpoint (see `training_state`) into the components."""
    c.byol.load_state_dict(state["model"])
    c.optimizer.load_state_dict(state["optimizer"])
    if c.scaler is not None and state.get("scaler"):
        c.scaler.load_state_dict(state["scaler"])


__all__ = ["AUTOCAST_DTYPES", "NO_FORWARD_BUFFER_SYNC", "Components", "build_components", "build_model",
           "compile_networks", "initial_encoder", "restore", "train_step", "training_state"]
