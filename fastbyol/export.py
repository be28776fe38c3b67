"""The online encoder's weights: read from a run, checked, written as a torchvision-style state_dict.

Where the weights come from (`encoder_state`):
- a run directory: its newest checkpoint that loads (`model` = the BYOL state_dict, of which the
  `online_encoder.*` entries are kept), else its encoder.pt (written at the end of training);
- a checkpoint_*.pt file (same);
- an encoder.pt (or any exported file): a plain state_dict with torchvision's ResNet keys.

An exported file is that plain state_dict, CPU, contiguous, nothing else, so that at width 1x with
the ImageNet stem torchvision reads it directly::

    model = torchvision.models.resnet50()
    missing, unexpected = model.load_state_dict(torch.load("encoder.pt"), strict=False)
    # missing == ["fc.weight", "fc.bias"] (the encoder has no classifier), unexpected == []
    # or, strictly: model.fc = torch.nn.Identity(); model.load_state_dict(sd, strict=True)

Wider encoders (2x, 4x scale every width, unlike torchvision's wide_resnet50_2) and the CIFAR stem
have no torchvision counterpart; they load into ours:
`fastbyol.models.resnet.resnet(depth, width, stem).load_state_dict(sd)`, with depth, width and stem
read back from the keys and shapes by `infer_architecture(sd)`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fastbyol import checkpoint
from fastbyol.config import load_run_config
from fastbyol.models.resnet import STAGES, ResNet, resnet
from pipelines.policy import IMAGENET_MEAN, IMAGENET_STD

ONLINE_PREFIX = "online_encoder."
# Wrappers that prefix a state_dict's keys: DDP (module.), torch.compile(model) (_orig_mod.)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class EncoderState:
    """An encoder's weights and where they came from."""

    state: dict[str, torch.Tensor]  # torchvision keys, CPU tensors
    source: str  # the file actually read
    run_dir: Path | None  # the run directory, when the source was one (or a checkpoint inside one)


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def online_encoder_state(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The `online_encoder.*` entries of a BYOL state_dict, prefix removed, contiguous, on the CPU."""
    out = {}
    for key, value in model_state.items():
        key = _strip(key)
        if key.startswith(ONLINE_PREFIX):
            out[key[len(ONLINE_PREFIX):]] = value.detach().contiguous().cpu()
    if not out:
        raise ValueError(f"no {ONLINE_PREFIX}* keys in the model state (keys start with "
                         f"{sorted({k.split('.')[0] for k in model_state})[:5]}): not a BYOL checkpoint")
    return out


def _read(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint (dict with "model") or a plain encoder state_dict -> the encoder's state."""
    try:
        obj = checkpoint.load_weights(path)
    except checkpoint.UnsafeWeights:
        raise
    except Exception as e:
        raise ValueError(f"{path}: cannot be read by torch.load ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        return online_encoder_state(obj["model"])
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = {_strip(k): v.detach().contiguous().cpu() for k, v in obj.items()}
        if any(k.startswith(ONLINE_PREFIX) for k in state):  # a bare BYOL state_dict
            return online_encoder_state(state)
        return state
    raise ValueError(f"{path}: expected a fastbyol checkpoint (a dict with 'model') or an encoder "
                     f"state_dict (a dict of tensors), got {type(obj).__name__}")


def encoder_state(source: str | Path) -> EncoderState:
    """The online encoder's weights from a run directory, a checkpoint file or an encoder.pt; weights
    that are not finite (a diverged run) are refused in one line."""
    found = _encoder_state(source)
    bad = [k for k, v in found.state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{found.source}: the weights are not finite ({len(bad)} tensor(s), e.g. {bad[0]}): the run "
                         "diverged before this was written; use an earlier checkpoint")
    return found


def _encoder_state(source: str | Path) -> EncoderState:
    source = Path(source)
    if source.is_dir():
        newest = checkpoint.load_latest(source)  # passes over a damaged newest checkpoint, with a warning
        if newest is not None:
            return EncoderState(online_encoder_state(newest["model"]), newest["path"], source)
        if (source / "encoder.pt").is_file():
            return EncoderState(_read(source / "encoder.pt"), str(source / "encoder.pt"), source)
        raise FileNotFoundError(f"{source}: no checkpoint_*.pt and no encoder.pt in this directory "
                                f"(expected a fastbyol run directory)")
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such file or run directory")
    in_run = source.parent if (source.parent / "config.yaml").is_file() else None
    return EncoderState(_read(source), str(source), in_run)


def infer_architecture(state: dict[str, torch.Tensor]) -> tuple[int, int, str]:
    """(depth, width, stem) of a ResNet state_dict, from its keys and shapes.

    stem: the first conv's kernel (7x7 imagenet, 3x3 cifar); width: its output channels / 64;
    depth: the block kind (a conv3 means bottleneck) and the number of blocks in each stage.
    """
    conv1 = state.get("conv1.weight")
    if conv1 is None or conv1.ndim != 4:
        raise ValueError("not a ResNet state_dict: no 4-d conv1.weight "
                         f"(first keys: {list(state)[:4]})")
    stem = {7: "imagenet", 3: "cifar"}.get(conv1.shape[-1])
    width, rest = divmod(conv1.shape[0], 64)
    if stem is None or rest:
        raise ValueError(f"conv1.weight has shape {list(conv1.shape)}: expected (64*width, 3, 7, 7) "
                         "(imagenet stem) or (64*width, 3, 3, 3) (cifar stem)")
    blocks = []
    for stage in range(1, 5):
        found = {int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        blocks.append(max(found) + 1 if found else 0)
    kind = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    for depth, spec in STAGES.items():
        if spec == (kind, tuple(blocks)):
            return depth, width, stem
    raise ValueError(f"a ResNet with {kind} blocks {blocks} per stage is not one of depths "
                     f"{', '.join(map(str, STAGES))}")


def build_encoder(state: dict[str, torch.Tensor], depth: int | None = None, width: int | None = None,
                  stem: str | None = None) -> ResNet:
    """Our ResNet with `state` loaded strictly; architecture values not given are inferred."""
    inferred = infer_architecture(state)
    depth, width, stem = depth or inferred[0], width or inferred[1], stem or inferred[2]
    encoder = resnet(depth, width, stem)
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"the weights do not fit resnet(depth={depth}, width={width}, stem={stem!r}) "
                         f"(the weights look like depth={inferred[0]}, width={inferred[1]}, "
                         f"stem={inferred[2]!r}): {str(e).splitlines()[0]}") from None
    return encoder


def torchvision_note(depth: int, width: int, stem: str) -> str:
    """How to load an exported encoder of this architecture (printed by `fastbyol export`)."""
    if width == 1 and stem == "imagenet" and depth in (18, 34, 50, 101, 152):
        return (f"torchvision.models.resnet{depth}().load_state_dict(torch.load(path), strict=False) "
                "loads it; missing keys: fc.weight, fc.bias only (no classifier in the encoder)")
    return (f"no torchvision counterpart (width {width}x, {stem} stem, depth {depth}): load it with "
            f"fastbyol.models.resnet.resnet({depth}, {width}, {stem!r}).load_state_dict(torch.load(path))")


def export_encoder(source: str | Path, out: str | Path) -> dict:
    """Write the online encoder of `source` (run dir, checkpoint or encoder.pt) to `out`, atomically.

    The file holds a plain state_dict (torchvision keys, CPU, contiguous). The weights are loaded
    strictly into our ResNet first, so a file that is written is a file that loads. Returns
    {"path", "source", "depth", "width", "stem", "num_params", "note"}.
    """
    found = encoder_state(source)
    depth, width, stem = infer_architecture(found.state)
    build_encoder(found.state, depth, width, stem)  # raises if the weights are not a whole ResNet
    out = Path(out)
    if out.is_dir():
        raise IsADirectoryError(f"{out}: is a directory; give the output file, e.g. {out / 'encoder.pt'}")
    checkpoint.atomic_save(found.state, out)
    num_params = sum(v.numel() for k, v in found.state.items() if not k.endswith(("running_mean", "running_var",
                                                                                  "num_batches_tracked")))
    return {"path": str(out), "source": found.source, "depth": depth, "width": width, "stem": stem,
            "num_params": num_params, "note": torchvision_note(depth, width, stem)}


# ---------------------------------------------------------------- an encoder to evaluate


@dataclass
class LoadedEncoder:
    """An encoder ready to evaluate, and what its run says about its inputs."""

    encoder: nn.Module
    source: str  # the file the weights came from ("random init" for the baseline)
    run_dir: Path | None
    depth: int
    width: int
    stem: str
    image_size: int  # the run's eval.image_size or training crop size; 224 without a run
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    train_path: str  # the run's eval.train_path / eval.val_path, "" without a run
    val_path: str


def load_encoder(source: str | os.PathLike, depth: int | None = None, width: int | None = None,
                 stem: str | None = None, random_init: bool = False) -> LoadedEncoder:
    """The online encoder of a run directory, a checkpoint or an encoder.pt, on the CPU.

    A run directory (or a file inside one) also gives the input size, the normalization and the
    default eval folders from its config.yaml. depth / width / stem not given come from the
    run's config, else are read from the weights' keys and shapes (fastbyol.export.infer_architecture).
    random_init=True keeps the architecture but not the weights: the encoder as the run's
    train.seed initialised it before training (the baseline pretraining must beat).
    """
    if random_init and (Path(source) / "config.yaml").is_file():  # a run's baseline needs only its config
        found = EncoderState({}, str(source), Path(source))
    else:
        found = encoder_state(source)
    cfg = None
    if found.run_dir is not None and (found.run_dir / "config.yaml").is_file():
        cfg = load_run_config(found.run_dir)
    if cfg is not None:
        depth, width, stem = depth or cfg.model.depth, width or cfg.model.width, stem or cfg.model.stem
    else:
        inferred = infer_architecture(found.state)
        depth, width, stem = depth or inferred[0], width or inferred[1], stem or inferred[2]
    if random_init:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed if cfg is not None else 0)  # as build_components seeds it
            encoder = resnet(depth, width, stem, cfg.model.zero_init_residual if cfg is not None else False)
        where = "random init"
    else:
        encoder = build_encoder(found.state, depth, width, stem)
        where = found.source
    if cfg is not None:
        return LoadedEncoder(encoder, where, found.run_dir, depth, width, stem,
                             cfg.eval.image_size or cfg.augment.view1.crop_size, tuple(cfg.augment.mean),
                             tuple(cfg.augment.std), cfg.eval.train_path, cfg.eval.val_path)
    return LoadedEncoder(encoder, where, found.run_dir, depth, width, stem, 224, IMAGENET_MEAN, IMAGENET_STD, "", "")


__all__ = ["EncoderState", "LoadedEncoder", "build_encoder", "encoder_state", "export_encoder", "infer_architecture",
           "load_encoder", "online_encoder_state", "torchvision_note"]
