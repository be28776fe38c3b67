"""Semi-supervised fine-tuning (the paper's 1% / 10% protocol): encoder + linear head trained end
to end on a class-balanced labelled subset (pipelines.labelled.label_subset), top-1 / top-5 on val.
"""

from __future__ import annotations

import time
from typing import Iterator, Sequence

import torch
from torch import nn

from fastbyol.knn import autocast, device_of
from fastbyol.linear import AUGMENTED, Log, accuracy, epoch_batches, fit, linear_head
from pipelines.labelled import EvalData


def finetune(encoder: nn.Module, data: EvalData, subset: Sequence[int], *, epochs: int = 30,
             lr: float | None = None, weight_decay: float = 0.0, seed: int = 0, log: Log | None = None) -> dict:
    """Semi-supervised fine-tuning: encoder + linear head trained end to end on the train images
    `subset` (indices), then top-1 / top-5 in percent on all of data's val.

    SGD Nesterov momentum 0.9, lr cosine-decayed per step from `lr` (default 0.05 * batch / 256)
    to 0, random resized crop + flip; the encoder's BatchNorm runs in train mode. The encoder is
    trained in place.
    """
    log = log or (lambda s: None)
    start = time.perf_counter()
    device = device_of(encoder)
    peak_lr = lr if lr is not None else 0.05 * data.images.batch_size / 256
    paths = [data.train_paths[i] for i in subset]
    labels = [data.train_labels[i] for i in subset]
    b = min(data.images.batch_size, len(paths))
    if b < 2:
        raise ValueError(f"fine-tuning on {len(paths)} labeled image(s): BatchNorm needs batches of at least 2")
    model = nn.Sequential(encoder, linear_head(encoder.num_features, len(data.classes), device))
    model.requires_grad_(True)

    def logits_of(x: torch.Tensor) -> torch.Tensor:
        with autocast(device):
            return model(x)

    def train_batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        keys = [[(epoch, i) for i in batch] for batch in epoch_batches(len(paths), b, seed, epoch)]
        return data.images.batches(paths, labels, keys, device, train=True, seed=seed)

    model.train()
    fit(model, train_batches, logits_of, epochs, len(epoch_batches(len(paths), b, seed, 0)), peak_lr,
         weight_decay, log)
    model.eval()
    top1, top5 = accuracy(data.val_batches(device), logits_of)
    return {"protocol": "finetune", "variant": AUGMENTED, "top1": top1, "top5": top5, "num_labeled": len(paths),
            "label_fraction": len(paths) / len(data.train_paths), "epochs": epochs, "lr": peak_lr, "batch_size": b,
            "weight_decay": weight_decay, "seed": seed, **data.summary(), "time_s": time.perf_counter() - start}


__all__ = ["finetune"]
