"""Linear evaluation (the paper's protocol) and the supervised fitting loop it shares with fine-tuning.

Frozen encoder in eval mode, one linear layer on the pooled features, SGD with Nesterov momentum
0.9 and a cosine schedule; random-resized-crop + flip for training. `precompute=True` is the fast
variant: features computed once without augmentation. Top-1 / top-5 in percent.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fastbyol.byol import split_decay_params
from fastbyol.knn import autocast, device_of, extract_features
from fastbyol.optim import lr_at
from pipelines.labelled import EvalData
from pipelines.seeding import numpy_rng

PRECOMPUTED = "precomputed features, no augmentation (fast variant, not the paper's protocol)"
AUGMENTED = "random resized crop + flip (the paper's protocol)"

Log = Callable[[str], None]


def _topk_hits(logits: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = ranked == y[:, None]
    return int(hits[:, 0].sum()), int(hits.any(dim=1).sum())


def sgd(module: nn.Module, lr: float, weight_decay: float) -> torch.optim.SGD:
    """SGD, Nesterov momentum 0.9; weight decay on weights only (biases and BatchNorm excluded)."""
    decay, no_decay = split_decay_params((n, p) for n, p in module.named_parameters() if p.requires_grad)
    return torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}], lr=lr, momentum=0.9, nesterov=True)


def linear_head(dim: int, num_classes: int, device: torch.device) -> nn.Linear:
    head = nn.Linear(dim, num_classes)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    return head.to(device)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """A permutation of range(n) from numpy_rng(seed, epoch) in batches; the last, partial batch
    is dropped when there is more than one (steady batch statistics for fine-tuning)."""
    order = numpy_rng(seed, epoch).permutation(n).tolist()
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def fit(trainable: nn.Module, batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
         logits_of: Callable[[torch.Tensor], torch.Tensor], epochs: int, steps_per_epoch: int, peak_lr: float,
         weight_decay: float, log: Log) -> float:
    """Cross-entropy training of `trainable` with SGD Nesterov and a per-step cosine lr; returns
    the mean loss of the last epoch."""
    optimizer = sgd(trainable, peak_lr, weight_decay)
    total, step = epochs * steps_per_epoch, 0
    for epoch in range(epochs):
        loss_sum = torch.zeros(())
        seen = 0
        for x, y in batches(epoch):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, 0, peak_lr)
            loss = F.cross_entropy(logits_of(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach().cpu()
            seen += 1
            step += 1
        last = float(loss_sum) / max(1, seen)
        log(f"epoch {epoch + 1}/{epochs}  loss {last:.4f}  lr {lr_at(min(step, total), total, 0, peak_lr):.4g}")
    return last


def accuracy(batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
              logits_of: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, float]:
    c1 = c5 = m = 0
    with torch.no_grad():
        for x, y in batches:
            h1, h5 = _topk_hits(logits_of(x), y)
            c1, c5, m = c1 + h1, c5 + h5, m + len(y)
    return 100.0 * c1 / m, 100.0 * c5 / m


def linear_eval(encoder: nn.Module, data: EvalData, *, epochs: int = 80, lr: float | None = None,
                weight_decay: float = 0.0, precompute: bool = False, seed: int = 0, log: Log | None = None) -> dict:
    """Linear evaluation of the frozen `encoder` (eval mode): top-1 / top-5 in percent on data's val.

    A Linear(num_features, num_classes) layer (no BatchNorm, as in the paper) is trained with
    cross-entropy, SGD Nesterov momentum 0.9, lr cosine-decayed per step from `lr` (default
    0.2 * batch / 256, the official code's base rate) to 0 over `epochs`, weight decay on its
    weight only. Training images: random resized crop + flip; precompute=True instead encodes
    the test views once and trains on those cached features (fast, not the paper's protocol).
    """
    log = log or (lambda s: None)
    start = time.perf_counter()
    device = device_of(encoder)
    peak_lr = lr if lr is not None else 0.2 * data.images.batch_size / 256
    encoder.eval().requires_grad_(False)
    n, b = len(data.train_paths), data.images.batch_size
    steps = len(epoch_batches(n, b, seed, 0))
    if precompute:
        train_f, train_y = extract_features(encoder, data.train_paths, data.train_labels, data.images, normalize=False)
        val_f, val_y = extract_features(encoder, data.val_paths, data.val_labels, data.images, normalize=False)
        head = linear_head(train_f.shape[1], len(data.classes), device)

        def train_batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for idx in epoch_batches(n, b, seed, epoch):
                idx = torch.as_tensor(idx, device=device)
                yield train_f[idx], train_y[idx]

        fit(head, train_batches, head, epochs, steps, peak_lr, weight_decay, log)
        top1, top5 = accuracy(((val_f[i:i + b], val_y[i:i + b]) for i in range(0, len(val_f), b)), head)
    else:
        head = linear_head(encoder.num_features, len(data.classes), device)

        def logits_of(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), autocast(device):
                f = encoder(x)
            return head(f.float())

        def train_batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            keys = [[(epoch, i) for i in batch] for batch in epoch_batches(n, b, seed, epoch)]
            return data.images.batches(data.train_paths, data.train_labels, keys, device, train=True, seed=seed)

        fit(head, train_batches, logits_of, epochs, steps, peak_lr, weight_decay, log)
        top1, top5 = accuracy(data.val_batches(device), logits_of)
    return {"protocol": "linear", "variant": PRECOMPUTED if precompute else AUGMENTED, "top1": top1, "top5": top5,
            "epochs": epochs, "lr": peak_lr, "batch_size": b, "weight_decay": weight_decay, "seed": seed,
            **data.summary(), "time_s": time.perf_counter() - start}


__all__ = ["AUGMENTED", "PRECOMPUTED", "accuracy", "epoch_batches", "fit", "linear_eval", "linear_head", "sgd"]
