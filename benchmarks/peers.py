"""The same BYOL training step with fastbyol, lightly and byol-pytorch, timed side by side.

    python benchmarks/peers.py --device cuda --batch 256 --json peers.json    # ResNet-50, 224 px
    python benchmarks/peers.py --device cpu --depth 18 --stem cifar --size 16 --batch 4 \\
        --hidden 32 --proj 16 --steps 2 --rounds 1                           # the CI smoke run

One step = both views through the online encoder + projector + predictor and the target encoder +
projector, the symmetric BYOL loss, backward, a momentum optimizer step and the target EMA update.
Every contender gets the same backbone module (fastbyol's ResNet, copied from one initialisation),
the same initial head weights, the same synthetic views already on the device, the same global
batch, lr, weight decay, momentum and tau, and the same autocast dtype; what differs is the BYOL
machinery each library provides, used as its documentation shows:

- fastbyol: `build_components` + `train_step` (fused foreach LARS, foreach-lerp EMA, channels_last);
- lightly: BYOLProjectionHead / BYOLPredictionHead, NegativeCosineSimilarity, update_momentum with
  cosine_schedule, lightly.utils.lars.LARS and CosineWarmupScheduler, as in its ImageNet BYOL
  benchmark (benchmarks/imagenet/resnet50/byol.py in the lightly repository);
- byol-pytorch: its `BYOL` wrapper (hidden_layer=-1: the encoder's output), simplicial embeddings
  off (the paper's heads), augment_fn / augment_fn2 returning the two pre-made views (it takes one
  batch and makes both views itself), torch SGD with momentum (its README shows Adam; it ships no
  LARS), update_moving_average at its constant decay.

Timing: warm-up steps first (never timed; the first one also records each contender's loss), then
`rounds` rounds of `steps` steps per contender, alternated in one process (fastbyol, lightly,
byol-pytorch, fastbyol, ...) so drifts of clock or temperature hit all alike. A window is timed by
fastbyol.timing.time_window (the device synchronised before and after). images/sec counts
source images (each yields two views); the table gives the median over rounds.

A peer that is not installed (or cannot be imported) is reported as such and skipped. The peers
are benchmark-only dependencies: fastbyol itself never imports them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import importlib.util
import itertools
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from fastbyol.atomic import atomic_write_json
from fastbyol.byol import MLP
from fastbyol.config import load_config
from fastbyol.dist import DistInfo
from fastbyol.machine import machine_info
from fastbyol.optim import RunPlan
from fastbyol.step import build_components, train_step
from fastbyol.timing import time_window
from pipelines.synthetic import random_batch

CONTENDERS = ("fastbyol", "lightly", "byol-pytorch")
# Optional: fastbyol with byol.concat_views=true, the BatchNorm grouping byol-pytorch uses (one call on both views).
OPTIONAL = ("fastbyol-concat",)
PACKAGES = ("fastbyol", "lightly", "byol-pytorch", "torchvision", "accelerate", "einops", "torch")
JSON_KEYS = ("machine", "settings", "contenders")
CONTENDER_KEYS = ("name", "status", "reason", "images_per_sec", "step_ms", "ratio_to_fastbyol", "samples_images_per_sec",
                  "first_loss", "trainable_params", "peak_memory_bytes", "notes")


@dataclass
class Settings:
    """One benchmark: the model, the batch and how long to time it."""

    depth: int = 50  # ResNet depth (fastbyol.models.resnet): 18, 34, 50, 101, 152, 200
    stem: str = "imagenet"  # imagenet | cifar (3x3 stem for tiny images)
    size: int = 224  # view side, px
    batch: int = 256  # images per step (each gives two views)
    hidden: int = 4096  # projector / predictor hidden width
    proj: int = 256  # projection size
    steps: int = 20  # timed steps per contender per round
    warmup: int = 5  # untimed steps per contender before the rounds (>= 1)
    rounds: int = 5  # alternated rounds; the median over rounds is reported
    device: str = "auto"  # auto | cuda | cpu
    precision: str = "auto"  # auto (bf16 on cuda, fp32 on cpu) | bf16 | fp16 | fp32, for every contender
    peer_memory_format: str = "channels_last"  # channels_last (as fastbyol) | contiguous (as the peers' docs)
    seed: int = 0
    contenders: tuple[str, ...] = CONTENDERS
    fastbyol_overrides: tuple[str, ...] = ()  # extra `key=value` for fastbyol's config, e.g. byol.concat_views=true

    def validate(self) -> None:
        checks = [("depth", self.depth in (18, 34, 50, 101, 152, 200), "18, 34, 50, 101, 152 or 200"),
                  ("stem", self.stem in ("imagenet", "cifar"), "imagenet or cifar"),
                  ("size", self.size >= 8, ">= 8"), ("batch", self.batch >= 2, ">= 2 (BatchNorm needs two samples)"),
                  ("hidden", self.hidden >= 1, ">= 1"), ("proj", self.proj >= 1, ">= 1"),
                  ("steps", self.steps >= 1, ">= 1"), ("rounds", self.rounds >= 1, ">= 1"),
                  ("warmup", self.warmup >= 1, ">= 1 (the first step records the loss and is never timed)"),
                  ("device", self.device in ("auto", "cuda", "cpu"), "auto, cuda or cpu"),
                  ("precision", self.precision in ("auto", "bf16", "fp16", "fp32"), "auto, bf16, fp16 or fp32"),
                  ("peer_memory_format", self.peer_memory_format in ("channels_last", "contiguous"),
                   "channels_last or contiguous"),
                  ("contenders", "fastbyol" in self.contenders and set(self.contenders) <= set(CONTENDERS + OPTIONAL),
                   f"fastbyol and any of {', '.join(CONTENDERS[1:] + OPTIONAL)}")]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} = {getattr(self, name)!r}: expected {expected}")


@dataclass
class Contender:
    """One library's BYOL training step, built and ready to run on the fixed views."""

    name: str
    step: Callable[[], torch.Tensor]  # one full training step; returns the loss (a device tensor, no sync)
    to_fastbyol_loss: Callable[[float], float]  # this library's loss value -> sum over directions of mean(2 - 2 cos)
    online_encoder: nn.Module
    target_encoder: nn.Module
    trainable_params: int
    notes: dict[str, str] = field(default_factory=dict)


class PeerUnavailable(Exception):
    """A peer cannot be benchmarked here; `status` is "not installed" or "not importable"."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


# ---------------------------------------------------------------- shared set-up


@dataclass
class Shared:
    """What every contender starts from: the device, the views, the initial online weights, the hyper-parameters."""

    device: torch.device
    view1: torch.Tensor  # (B, 3, S, S) float32, channels_last
    view2: torch.Tensor
    encoder: nn.Module  # fastbyol ResNet at its initialisation (a private copy per contender is made)
    projector: MLP
    predictor: MLP
    feature_dim: int
    dtype: torch.dtype | None  # autocast dtype, None for fp32
    lr: float  # peak lr: 0.2 * batch / 256 (the paper's rule)
    weight_decay: float
    momentum: float
    tau_base: float
    total_steps: int  # for the cosine lr / tau schedules: warm-up + rounds * steps

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None


def resolve(settings: Settings) -> tuple[torch.device, str]:
    """(device, precision) with "auto" resolved; a cuda request without a GPU is an error."""
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    cuda = settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    precision = settings.precision if settings.precision != "auto" else ("bf16" if cuda else "fp32")
    return device, precision


def _backward_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None) -> None:
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    optimizer.zero_grad(set_to_none=True)


def _peer_modules(shared: Shared, memory_format: torch.memory_format) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A private copy of the initial encoder and the views, in the peers' memory format."""
    encoder = copy.deepcopy(shared.encoder).to(memory_format=memory_format)
    return encoder, shared.view1.contiguous(memory_format=memory_format), shared.view2.contiguous(memory_format=memory_format)


def _trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ---------------------------------------------------------------- fastbyol


def build_fastbyol(settings: Settings, precision: str, device: torch.device,
                   extra: tuple[str, ...] = (), name: str = "fastbyol") -> tuple[Contender, Shared]:
    """fastbyol's step (build_components + train_step) and, from its initialisation, what the peers share.

    `extra` config overrides come last (after --set); the initialisation depends only on the seed.
    """
    cfg = load_config(None, [
        "data.backend=synthetic", f"data.batch_size={settings.batch}", f"model.depth={settings.depth}",
        f"model.stem={settings.stem}", f"byol.hidden_dim={settings.hidden}", f"byol.proj_dim={settings.proj}",
        f"train.precision={precision}", f"train.seed={settings.seed}", *settings.fastbyol_overrides, *extra])
    total = settings.warmup + settings.rounds * settings.steps
    # one "epoch" of every timed step, no warm-up: the peers' schedules are built the same way
    plan = RunPlan(total, total, 0, cfg.optim.peak_lr(settings.batch), cfg.byol.tau_base)
    c = build_components(cfg, device, DistInfo(), plan.peak_lr)
    batch = random_batch(settings.batch, settings.size, device, seed=settings.seed)
    view1, view2 = batch.view1, batch.view2
    if not cfg.model.channels_last:
        view1, view2 = view1.contiguous(), view2.contiguous()
    shared = Shared(device, batch.view1, batch.view2, copy.deepcopy(c.byol.online_encoder),
                    copy.deepcopy(c.byol.online_projector), copy.deepcopy(c.byol.predictor),
                    c.byol.online_encoder.num_features, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision),
                    plan.peak_lr, cfg.optim.weight_decay, cfg.optim.momentum, plan.tau_base, total)
    counter = itertools.count()

    def step() -> torch.Tensor:
        k = next(counter)
        return train_step(c, view1, view2, plan.lr(k), plan.tau(k)).loss

    notes = {"optimizer": "fastbyol LARS (foreach)", "ema": "TargetEMA (foreach lerp)", "precision": precision,
             "memory_format": "channels_last" if cfg.model.channels_last else "contiguous",
             "batchnorm": "over both views" if cfg.byol.concat_views else "per view",
             "compile": str(cfg.model.compile)}
    contender = Contender(name, step, lambda loss: loss, c.byol.online_encoder, c.byol.target_encoder,
                          _trainable(c.byol), notes)
    return contender, shared


# ---------------------------------------------------------------- lightly


class LightlyBYOL(nn.Module):
    """The BYOL module of lightly's documentation: backbone, heads and their momentum copies."""

    def __init__(self, backbone: nn.Module, projection_head: nn.Module, prediction_head: nn.Module,
                 deactivate_requires_grad: Callable[[nn.Module], None]) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = projection_head
        self.prediction_head = prediction_head
        self.backbone_momentum = copy.deepcopy(backbone)
        self.projection_head_momentum = copy.deepcopy(projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prediction_head(self.projection_head(self.backbone(x).flatten(start_dim=1)))

    @torch.no_grad()
    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()


@torch.no_grad()
def _load_lightly_head(head: nn.Module, mlp: MLP) -> None:
    """Copy fastbyol's MLP into lightly's ProjectionHead (Linear without bias, BN, ReLU, Linear).

    lightly drops the bias of a Linear followed by BatchNorm; in train mode BN subtracts the batch
    mean, which removes any constant bias, so the outputs are the same.
    """
    first, bn, last = head.layers[0], head.layers[1], head.layers[3]
    first.weight.copy_(mlp[0].weight)
    bn.load_state_dict(mlp[1].state_dict())
    last.load_state_dict(mlp[3].state_dict())


def _import_peer(package: str, modules: tuple[str, ...]) -> list:
    if importlib.util.find_spec(package) is None:
        raise PeerUnavailable("not installed", f"pip install {package.replace('_', '-')} (see benchmarks/README.md)")
    try:
        return [importlib.import_module(m) for m in modules]
    except Exception as e:  # e.g. torchvision's CUDA-built wheel beside a CPU torch
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = "; it imports torchvision, which must load beside this torch" if "torchvision" in repr(e) or _torchvision_broken() else ""
        raise PeerUnavailable("not importable", f"{type(e).__name__}: {first}{hint}") from None


def _torchvision_broken() -> bool:
    try:
        importlib.import_module("torchvision")
        return False
    except Exception:
        return True


def build_lightly(shared: Shared, memory_format: torch.memory_format) -> Contender:
    """lightly's BYOL step as in its ImageNet BYOL benchmark (EMA first, then forward, LARS)."""
    loss_mod, heads, mutils, lars, sched = _import_peer("lightly", (
        "lightly.loss", "lightly.models.modules", "lightly.models.utils", "lightly.utils.lars", "lightly.utils.scheduler"))
    encoder, view1, view2 = _peer_modules(shared, memory_format)
    projection = heads.BYOLProjectionHead(shared.feature_dim, shared.projector[0].out_features, shared.projector[3].out_features)
    prediction = heads.BYOLPredictionHead(shared.predictor[0].in_features, shared.predictor[0].out_features,
                                          shared.predictor[3].out_features)
    _load_lightly_head(projection, shared.projector)
    _load_lightly_head(prediction, shared.predictor)
    model = LightlyBYOL(encoder, projection, prediction, mutils.deactivate_requires_grad).to(shared.device)
    criterion = loss_mod.NegativeCosineSimilarity()
    online = [model.backbone, model.projection_head, model.prediction_head]
    decay = [p for m in online for p in m.parameters() if p.ndim > 1]  # lightly's get_weight_decay_parameters rule
    no_decay = [p for m in online for p in m.parameters() if p.ndim <= 1]
    optimizer = lars.LARS([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=shared.lr,
                          momentum=shared.momentum, weight_decay=shared.weight_decay)
    scheduler = sched.CosineWarmupScheduler(optimizer, warmup_epochs=0, max_epochs=shared.total_steps)
    scaler = shared.scaler()
    counter = itertools.count()

    def step() -> torch.Tensor:
        m = sched.cosine_schedule(min(next(counter), shared.total_steps), shared.total_steps, shared.tau_base, 1.0)
        mutils.update_momentum(model.backbone, model.backbone_momentum, m=m)
        mutils.update_momentum(model.projection_head, model.projection_head_momentum, m=m)
        with shared.autocast():
            z0, z1 = model.forward_momentum(view1), model.forward_momentum(view2)
            p0, p1 = model(view1), model(view2)
            # lightly's benchmark: 2 * (-cos) per direction, so loss = fastbyol's loss - 4
            loss = 2 * criterion(z0, p1) + 2 * criterion(z1, p0)
        _backward_step(loss, optimizer, scaler)
        scheduler.step()
        return loss

    notes = {"optimizer": "lightly.utils.lars.LARS", "ema": "lightly update_momentum (foreach)",
             "precision": _precision_name(shared.dtype), "memory_format": _format_name(memory_format),
             "batchnorm": "per view"}
    return Contender("lightly", step, lambda loss: loss + 4.0, model.backbone, model.backbone_momentum,
                     _trainable(model), notes)


# ---------------------------------------------------------------- byol-pytorch


def _first_half(x: torch.Tensor) -> torch.Tensor:
    return x[: x.shape[0] // 2]


def _second_half(x: torch.Tensor) -> torch.Tensor:
    return x[x.shape[0] // 2:]


def build_byol_pytorch(shared: Shared, memory_format: torch.memory_format) -> Contender:
    """byol-pytorch's BYOL wrapper; its input is cat(view1, view2), split back by augment_fn / augment_fn2."""
    (byol_pytorch,) = _import_peer("byol_pytorch", ("byol_pytorch",))
    encoder, view1, view2 = _peer_modules(shared, memory_format)
    both = torch.cat([view1, view2])  # once, untimed: byol-pytorch takes one batch and "augments" it twice
    learner = byol_pytorch.BYOL(
        encoder, image_size=view1.shape[-1], hidden_layer=-1,
        projection_size=shared.projector[3].out_features, projection_hidden_size=shared.projector[0].out_features,
        augment_fn=_first_half, augment_fn2=_second_half, moving_average_decay=shared.tau_base,
        use_momentum=True, use_simplicial_embeddings=False)
    with torch.no_grad():  # its constructor ran a mock forward that built the projector and the target: reload all
        learner.online_encoder.net.load_state_dict(shared.encoder.state_dict())
        learner.online_encoder.projector.load_state_dict(shared.projector.state_dict())
        learner.online_predictor.load_state_dict(shared.predictor.state_dict())
        learner.target_encoder.load_state_dict(learner.online_encoder.state_dict())
    learner.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(learner.parameters(), lr=shared.lr, momentum=shared.momentum,
                                weight_decay=shared.weight_decay)
    scaler = shared.scaler()

    def step() -> torch.Tensor:
        with shared.autocast():
            loss = learner(both)
        _backward_step(loss, optimizer, scaler)
        learner.update_moving_average()
        return loss

    notes = {"optimizer": "torch.optim.SGD (momentum)", "ema": "update_moving_average (per tensor)",
             "precision": _precision_name(shared.dtype), "memory_format": _format_name(memory_format),
             "batchnorm": "over both views"}
    return Contender("byol-pytorch", step, lambda loss: loss, learner.online_encoder.net, learner.target_encoder.net,
                     _trainable(learner), notes)


def _precision_name(dtype: torch.dtype | None) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def _format_name(memory_format: torch.memory_format) -> str:
    return "channels_last" if memory_format == torch.channels_last else "contiguous"


# ---------------------------------------------------------------- timing


@dataclass
class Built:
    """The contenders ready to run, the peers that could not be built, and what they share."""

    contenders: list[Contender]
    unavailable: dict[str, PeerUnavailable]
    shared: Shared


def build_contenders(settings: Settings) -> Built:
    """fastbyol first (it owns the initialisation), then each requested contender that can be built."""
    settings.validate()
    device, precision = resolve(settings)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    fastbyol, shared = build_fastbyol(settings, precision, device)
    memory_format = torch.channels_last if settings.peer_memory_format == "channels_last" else torch.contiguous_format
    builders = {"lightly": build_lightly, "byol-pytorch": build_byol_pytorch}
    contenders, unavailable = [fastbyol], {}
    for name in settings.contenders:
        if name == "fastbyol":
            continue
        if name == "fastbyol-concat":
            contenders.append(build_fastbyol(settings, precision, device, ("byol.concat_views=true",), name)[0])
            continue
        try:
            contenders.append(builders[name](shared, memory_format))
        except PeerUnavailable as e:
            unavailable[name] = e
    return Built(contenders, unavailable, shared)


def run(settings: Settings, built: Built | None = None) -> dict[str, Any]:
    """Warm up and time every contender (built from `settings` unless `built` is given, e.g. to
    inspect the models afterwards); the result as a JSON-ready dict (see JSON_KEYS)."""
    built = built if built is not None else build_contenders(settings)
    contenders, unavailable, device = built.contenders, built.unavailable, built.shared.device
    first_loss = {}
    for c in contenders:
        first_loss[c.name] = c.to_fastbyol_loss(c.step().item())  # the one host sync, untimed
        for _ in range(settings.warmup - 1):
            c.step()
    samples: dict[str, list[float]] = {c.name: [] for c in contenders}
    peak: dict[str, int | None] = {c.name: None for c in contenders}
    for _ in range(settings.rounds):
        for c in contenders:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = time_window(c.step, settings.steps, device)
            samples[c.name].append(settings.batch * settings.steps / seconds)
            if device.type == "cuda":
                peak[c.name] = max(peak[c.name] or 0, torch.cuda.max_memory_allocated(device))
    ours = statistics.median(samples["fastbyol"])
    rows = {}
    for c in contenders:
        rate = statistics.median(samples[c.name])
        rows[c.name] = {"name": c.name, "status": "ok", "reason": "", "images_per_sec": rate,
                        "step_ms": 1e3 * settings.batch / rate, "ratio_to_fastbyol": rate / ours,
                        "samples_images_per_sec": samples[c.name], "first_loss": first_loss[c.name],
                        "trainable_params": c.trainable_params, "peak_memory_bytes": peak[c.name], "notes": c.notes}
    for name, e in unavailable.items():
        rows[name] = {"name": name, "status": e.status, "reason": e.reason, "images_per_sec": None, "step_ms": None,
                      "ratio_to_fastbyol": None, "samples_images_per_sec": [], "first_loss": None,
                      "trainable_params": None, "peak_memory_bytes": None, "notes": {}}
    _, precision = resolve(settings)
    recorded = {**asdict(settings), "device": device.type, "precision": precision,
                "backbone": f"fastbyol.models.resnet ResNet-{settings.depth} ({settings.stem} stem), "
                            f"one initialisation copied to every contender"}
    return {"machine": machine_info(device, PACKAGES), "settings": recorded,
            "contenders": [rows[n] for n in settings.contenders if n in rows]}


# ---------------------------------------------------------------- output


def print_table(result: dict[str, Any]) -> None:
    """A rich table (contender, images/sec, ratio to fastbyol, step ms, peak memory, first loss), then
    one line per contender with its optimizer, EMA, BatchNorm grouping and memory format (or why it was skipped)."""
    from rich.console import Console
    from rich.table import Table

    m, s = result["machine"], result["settings"]
    table = Table(title=f"BYOL step: ResNet-{s['depth']}, {s['size']} px, batch {s['batch']}, heads "
                        f"{s['hidden']}->{s['proj']}, {s['precision']}, {m['gpu']}, torch {m['torch']}")
    table.add_column("contender", no_wrap=True)
    for col in ("images/sec", "vs fastbyol", "step ms", "peak GiB", "loss, step 1"):
        table.add_column(col, justify="right", no_wrap=True)
    for row in result["contenders"]:
        if row["status"] != "ok":
            table.add_row(row["name"], row["status"], "", "", "", "")
            continue
        peak = f"{row['peak_memory_bytes'] / 2**30:.1f}" if row["peak_memory_bytes"] else "-"
        table.add_row(row["name"], f"{row['images_per_sec']:.1f}", f"{row['ratio_to_fastbyol']:.2f}x",
                      f"{row['step_ms']:.1f}", peak, f"{row['first_loss']:.4f}")
    console = Console()
    console.print(table)
    for row in result["contenders"]:
        detail = "; ".join(f"{k} {v}" for k, v in row["notes"].items()) if row["status"] == "ok" else row["reason"]
        console.print(f"  {row['name']}: {detail}", highlight=False)
    console.print(f"backbone: {s['backbone']}. Median of {s['rounds']} rounds x {s['steps']} steps after "
                  f"{s['warmup']} warm-up steps; synthetic views already on {s['device']}; "
                  f"loss, step 1 = sum over both directions of mean(2 - 2 cos), same initial weights and views.",
                  highlight=False)


def parse_args(argv: list[str] | None = None) -> tuple[Settings, Path | None, int]:
    """(settings, --json path or None, --threads) from the command line."""
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=d.depth, help="ResNet depth")
    p.add_argument("--stem", default=d.stem, choices=("imagenet", "cifar"))
    p.add_argument("--size", type=int, default=d.size, help="view side in px")
    p.add_argument("--batch", type=int, default=d.batch, help="images per step (each gives two views)")
    p.add_argument("--hidden", type=int, default=d.hidden, help="projector/predictor hidden width")
    p.add_argument("--proj", type=int, default=d.proj, help="projection size")
    p.add_argument("--steps", type=int, default=d.steps, help="timed steps per contender per round")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps per contender first (>= 1)")
    p.add_argument("--rounds", type=int, default=d.rounds, help="alternated rounds (median reported)")
    p.add_argument("--device", default=d.device, choices=("auto", "cuda", "cpu"))
    p.add_argument("--precision", default=d.precision, choices=("auto", "bf16", "fp16", "fp32"),
                   help="autocast dtype for every contender (auto: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--peer-memory-format", default=d.peer_memory_format, choices=("channels_last", "contiguous"))
    p.add_argument("--contenders", default=",".join(d.contenders),
                   help="comma-separated, from " + ",".join(CONTENDERS + OPTIONAL) + " (fastbyol is always run)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="fastbyol config override, e.g. --set byol.concat_views=true (repeatable)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    a = p.parse_args(argv)
    contenders = tuple(n.strip() for n in a.contenders.split(",") if n.strip())
    if "fastbyol" not in contenders:
        contenders = ("fastbyol", *contenders)  # the baseline of every ratio
    settings = Settings(a.depth, a.stem, a.size, a.batch, a.hidden, a.proj, a.steps, a.warmup, a.rounds, a.device,
                        a.precision, a.peer_memory_format, a.seed, contenders, tuple(a.set))
    return settings, a.json, a.threads


def main(argv: list[str] | None = None) -> int:
    settings, json_path, threads = parse_args(argv)
    if threads > 0:
        torch.set_num_threads(threads)  # on a busy CPU, one thread per process avoids OpenMP stalls
    try:
        settings.validate()
    except ValueError as e:
        print(f"benchmarks/peers.py: {e}", file=sys.stderr)
        return 2
    result = run(settings)
    print_table(result)
    if json_path is not None:
        atomic_write_json(result, json_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
