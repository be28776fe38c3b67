"""The weighted kNN protocol (InstDisc / DINO) and the kNN monitor of a training run.

Frozen encoder, l2-normalized pooled features of the test views; each val image takes the k train
images of highest cosine similarity, each votes for its class with weight exp(similarity / T);
the classes are ranked by their summed votes. Top-1 / top-5 in percent.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastbyol import dist
from pipelines.labelled import EvalData, EvalImages, labeled_pair


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; float32 elsewhere (CPU autocast is slower than fp32 for convolutions)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def device_of(module: nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (the CPU for one with neither)."""
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


class RawPixels(nn.Module):
    """The "no encoder" baseline: the test view's normalized pixels, flattened to (B, 3*S*S).

    kNN on these features is the raw-pixel kNN: the same views, vote and k as an encoder's, so a
    trained encoder that does not beat it has learned nothing a pixel comparison lacks.
    """

    def __init__(self, image_size: int) -> None:
        super().__init__()
        self.num_features = 3 * image_size * image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


@torch.no_grad()
def extract_features(encoder: nn.Module, paths: Sequence[str], labels: Sequence[int], images: EvalImages, *,
                     normalize: bool = True, gather: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of the frozen `encoder` on the test views of `paths`.

    Returns (N, D) float32 features (rows l2-normalized unless normalize=False) and (N,) int64
    labels, on the encoder's device. The encoder runs in eval mode (its mode is restored after),
    under bf16 autocast on CUDA. Under torch.distributed each rank encodes paths[rank::world];
    gather=True then all-gathers so every rank returns all N rows in order, gather=False returns
    the rank's own rows and labels.
    """
    device = device_of(encoder)
    rank, world = dist.rank_and_world()
    index = list(range(rank, len(paths), world))
    b = images.batch_size
    chunks = []
    was_training = encoder.training
    encoder.eval()
    try:
        for x, _ in images.batches(paths, labels, [index[i:i + b] for i in range(0, len(index), b)], device):
            with autocast(device):
                f = encoder(x)
            f = f.float()
            chunks.append(F.normalize(f, dim=1) if normalize else f)
    finally:
        encoder.train(was_training)
    dim = chunks[0].shape[1] if chunks else encoder.num_features
    feats = torch.cat(chunks) if chunks else torch.empty(0, dim, device=device)
    all_labels = torch.as_tensor(list(labels), dtype=torch.int64, device=device)
    if world > 1 and gather:
        return dist.gather_rows(feats, len(paths)), all_labels
    return feats, all_labels[index]


def knn_counts(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
               val_labels: torch.Tensor, k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
               chunk_size: int | None = None) -> tuple[int, int]:
    """(top-1 correct, top-5 correct) counts of the weighted kNN vote; see knn_accuracy."""
    if k < 1 or temperature <= 0:
        raise ValueError(f"k = {k}, temperature = {temperature}: expected k >= 1 and temperature > 0")
    n = train_feats.shape[0]
    if n == 0:
        raise ValueError("knn: the train feature bank is empty")
    k = min(k, n)
    num_classes = num_classes or int(train_labels.max()) + 1
    top = min(5, num_classes)
    # Each chunk's (chunk, n) similarity matrix stays near 2^27 values (512 MB in float32).
    chunk_size = chunk_size or max(1, 2**27 // n)
    train_labels = train_labels.to(train_feats.device)
    correct1 = correct5 = 0
    for start in range(0, val_feats.shape[0], chunk_size):
        q = val_feats[start:start + chunk_size].to(train_feats.device)
        y = val_labels[start:start + chunk_size].to(train_feats.device)
        sim, idx = (q @ train_feats.T).float().topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        ranked = votes.topk(top, dim=1).indices
        hits = ranked == y[:, None]
        correct1 += int(hits[:, 0].sum())
        correct5 += int(hits.any(dim=1).sum())
    return correct1, correct5


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                 val_labels: torch.Tensor, k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                 chunk_size: int | None = None) -> tuple[float, float]:
    """Weighted kNN top-1 and top-5 accuracy in percent (InstDisc / DINO vote).

    train_feats (N, D) and val_feats (M, D): l2-normalized rows (cosine similarity = dot product);
    labels (N,), (M,) int64 in [0, num_classes). Each val row takes its k most similar train rows;
    neighbour j votes exp(sim_j / temperature) for its class; the class with the largest summed
    vote is the top-1 prediction, the 5 largest the top-5 (with fewer than 5 classes top-5 = all).
    The similarity matmul runs `chunk_size` val rows at a time.
    """
    m = val_feats.shape[0]
    if m == 0:
        raise ValueError("knn: no val features")
    c1, c5 = knn_counts(train_feats, train_labels, val_feats, val_labels, k, temperature, num_classes, chunk_size)
    return 100.0 * c1 / m, 100.0 * c5 / m


class KNNMonitor:
    """kNN accuracy of an encoder on one labelled (train, val) pair, ready to be called every few epochs.

    Distributed: every rank encodes its share of both folders; the train features are all-gathered
    (each rank holds the full bank, N x D float32), each rank classifies its share of the val
    images and the hit counts are summed, so every rank returns the same numbers.
    """

    def __init__(self, train_path: str, val_path: str, images: EvalImages, k: int = 20,
                 temperature: float = 0.07) -> None:
        self.train_paths, self.train_labels, self.val_paths, self.val_labels, self.classes = labeled_pair(
            train_path, val_path)
        self.images, self.k, self.temperature = images, k, temperature

    @classmethod
    def from_config(cls, cfg) -> KNNMonitor:
        """The monitor of a training Config's `eval` section (image_size 0 = the training crop size)."""
        e = cfg.eval
        images = EvalImages(e.image_size or cfg.augment.view1.crop_size, tuple(cfg.augment.mean),
                            tuple(cfg.augment.std), e.batch_size, e.num_workers, cfg.model.channels_last)
        return cls(e.train_path, e.val_path, images, e.k, e.temperature)

    def __call__(self, encoder: nn.Module) -> dict[str, float]:
        """{"knn_top1": %, "knn_top5": %} of `encoder` (called on every rank when distributed)."""
        train_f, train_y = extract_features(encoder, self.train_paths, self.train_labels, self.images)
        val_f, val_y = extract_features(encoder, self.val_paths, self.val_labels, self.images, gather=False)
        counts = torch.tensor([0, 0, val_f.shape[0]], dtype=torch.int64, device=train_f.device)
        if val_f.shape[0]:
            c1, c5 = knn_counts(train_f, train_y, val_f, val_y, self.k, self.temperature, len(self.classes))
            counts[0], counts[1] = c1, c5
        c1, c5, m = dist.all_reduce_sum(counts).tolist()
        return {"knn_top1": 100.0 * c1 / m, "knn_top5": 100.0 * c5 / m}


def knn_eval(encoder: nn.Module, data: EvalData, k: int = 20, temperature: float = 0.07) -> dict:
    """The weighted kNN accuracy of `encoder` on `data` as a result dict (percent)."""
    start = time.perf_counter()
    train_f, train_y = extract_features(encoder, data.train_paths, data.train_labels, data.images)
    val_f, val_y = extract_features(encoder, data.val_paths, data.val_labels, data.images)
    top1, top5 = knn_accuracy(train_f, train_y, val_f, val_y, k, temperature, len(data.classes))
    return {"protocol": "knn", "top1": top1, "top5": top5, "k": k, "temperature": temperature, **data.summary(),
            "time_s": time.perf_counter() - start}


__all__ = ["KNNMonitor", "RawPixels", "autocast", "device_of", "extract_features", "knn_accuracy", "knn_counts", "knn_eval"]
