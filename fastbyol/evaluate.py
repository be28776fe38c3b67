"""How good is the encoder: the weighted kNN monitor, linear evaluation and semi-supervised fine-tuning.

All three read a labeled ImageFolder pair (train, val) and report top-1 / top-5 accuracy in percent.

- kNN (InstDisc / DINO): frozen encoder, l2-normalized pooled features; each val image takes the
  k train images of highest cosine similarity, each votes for its class with weight
  exp(similarity / T); the classes are ranked by their summed votes.
- linear (the paper's protocol): frozen encoder in eval mode, one linear layer on the pooled
  features, SGD with Nesterov momentum 0.9 and a cosine schedule; random-resized-crop + flip for
  training. `precompute=True` is the fast variant: features computed once without augmentation.
- fine-tune (the paper's 1% / 10% semi-supervised protocol): encoder + linear head trained end to
  end on a class-balanced labeled subset.

Test images: short side resized to image_size*256/224, then a center crop of image_size (the
paper's 256 -> 224). Below 128 px (CIFAR-sized data, the demo) the whole image is kept: short side
resized to image_size, then the center crop. Every random draw (crops, flips, order, subsets) is a
function of (seed, epoch, index); feature extraction never touches the global RNG, so running the
kNN monitor during training does not change the training run.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fastbyol import dist
from fastbyol.byol import split_decay_params
from fastbyol.config import load_run_config
from fastbyol.optim import lr_at
from pipelines.crops import sample_crop
from pipelines.folder import decode_rgb, find_images
from pipelines.policy import IMAGENET_MEAN, IMAGENET_STD
from pipelines.seeding import numpy_rng

SMALL_IMAGE = 128  # below this test size, the test transform keeps the whole image (no 256/224 margin)
TRAIN_CROP_SCALE = (0.08, 1.0)  # random-resized-crop of linear evaluation and fine-tuning
TRAIN_CROP_RATIO = (3 / 4, 4 / 3)
PRECOMPUTED = "precomputed features, no augmentation (fast variant, not the paper's protocol)"
AUGMENTED = "random resized crop + flip (the paper's protocol)"

Log = Callable[[str], None]


# ---------------------------------------------------------------- labeled images


def eval_resize(image_size: int, resize_ratio: float | None = None) -> int:
    """Short side (pixels) the test transform resizes to before its center crop of `image_size`.

    Default ratio: 256/224 at 128 px and above (the paper: 256 then 224), 1 below (whole image).
    """
    if resize_ratio is None:
        resize_ratio = 256 / 224 if image_size >= SMALL_IMAGE else 1.0
    if resize_ratio < 1:
        raise ValueError(f"resize_ratio = {resize_ratio}: expected >= 1 (the crop must fit the resized image)")
    return max(image_size, round(image_size * resize_ratio))


def center_view(image: Image.Image, image_size: int, resize: int) -> Image.Image:
    """Resize the short side to `resize` (bicubic, antialiased), then center crop image_size^2."""
    w, h = image.size
    if min(w, h) != resize:
        scale = resize / min(w, h)
        w, h = max(resize, round(w * scale)), max(resize, round(h * scale))
        image = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - image_size) // 2, (h - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


def random_view(image: Image.Image, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Random resized crop (area 0.08-1, ratio 3/4-4/3) to image_size^2, then a flip with p 0.5."""
    top, left, h, w = sample_crop(rng, image.height, image.width, TRAIN_CROP_SCALE, TRAIN_CROP_RATIO)
    image = image.crop((left, top, left + w, top + h)).resize((image_size, image_size), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


class LabeledImages(Dataset):
    """(uint8 (3, S, S) image, label) pairs; items are addressed by index or (epoch, index).

    train=False: the test transform (deterministic). train=True: random_view drawn from
    numpy_rng(seed, epoch, index), so any worker count gives the same images.
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int], image_size: int, train: bool = False,
                 seed: int = 0, resize_ratio: float | None = None) -> None:
        self.paths, self.labels = list(paths), list(labels)
        self.image_size, self.train, self.seed = image_size, train, seed
        self.resize = eval_resize(image_size, resize_ratio)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image = decode_rgb(self.paths[index])
        if self.train:
            image = random_view(image, self.image_size, numpy_rng(self.seed, epoch, index))
        else:
            image = center_view(image, self.image_size, self.resize)
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous(), self.labels[index]


def labeled_pair(train_path: str | os.PathLike, val_path: str | os.PathLike) -> tuple[list[str], list[int], list[str], list[int], list[str]]:
    """(train paths, train labels, val paths, val labels, classes) of two ImageFolders.

    Val labels index the train classes by folder name, so a val folder with fewer classes still
    lines up; a val class absent from train is an error.
    """
    train_paths, train_labels, classes = find_images(train_path)
    val_paths, val_labels, val_classes = find_images(val_path)
    unknown = sorted(set(val_classes) - set(classes))
    if unknown:
        raise ValueError(f"{val_path}: classes {unknown[:5]} are not among the {len(classes)} classes of {train_path}")
    index = {name: i for i, name in enumerate(classes)}
    val_labels = [index[val_classes[y]] for y in val_labels]
    return train_paths, train_labels, val_paths, val_labels, classes


def _loader(dataset: Dataset, batches: list[list], num_workers: int, device: torch.device) -> DataLoader:
    # An explicit generator: the DataLoader would otherwise draw its seed from the global torch RNG,
    # and the kNN monitor would shift the random state of the training run it watches.
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers, pin_memory=device.type == "cuda",
                      generator=torch.Generator().manual_seed(0))


def _inputs(x: torch.Tensor, device: torch.device, mean: Sequence[float], std: Sequence[float],
            channels_last: bool) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> normalized float32 on `device`, as the training views are."""
    x = x.to(device, non_blocking=True).float().div_(255.0)
    x = (x - torch.tensor(mean, device=device).view(1, 3, 1, 1)) / torch.tensor(std, device=device).view(1, 3, 1, 1)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; float32 elsewhere (CPU autocast is slower than fp32 for convolutions)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


# ---------------------------------------------------------------- features and kNN


@torch.no_grad()
def extract_features(encoder: nn.Module, paths: Sequence[str], labels: Sequence[int], *, image_size: int,
                     mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                     batch_size: int = 256, num_workers: int = 4, channels_last: bool = False,
                     resize_ratio: float | None = None, normalize: bool = True,
                     gather: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of the frozen `encoder` on the test views of `paths`.

    Returns (N, D) float32 features (rows l2-normalized unless normalize=False) and (N,) int64
    labels, on the encoder's device. The encoder runs in eval mode (its mode is restored after),
    under bf16 autocast on CUDA. Under torch.distributed each rank encodes paths[rank::world];
    gather=True then all-gathers so every rank returns all N rows in order, gather=False returns
    the rank's own rows and labels.
    """
    device = _device_of(encoder)
    rank, world = dist.rank_and_world()
    index = list(range(rank, len(paths), world))
    dataset = LabeledImages(paths, labels, image_size, resize_ratio=resize_ratio)
    batches = [index[i:i + batch_size] for i in range(0, len(index), batch_size)]
    chunks = []
    was_training = encoder.training
    encoder.eval()
    try:
        for x, _ in _loader(dataset, batches, num_workers, device):
            with _autocast(device):
                f = encoder(_inputs(x, device, mean, std, channels_last))
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
    """kNN accuracy of an encoder on one labeled (train, val) pair, ready to be called every few epochs.

    Distributed: every rank encodes its share of both folders; the train features are all-gathered
    (each rank holds the full bank, N x D float32), each rank classifies its share of the val
    images and the hit counts are summed, so every rank returns the same numbers.
    """

    def __init__(self, train_path: str, val_path: str, *, image_size: int, k: int = 20, temperature: float = 0.07,
                 batch_size: int = 256, num_workers: int = 4, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, channels_last: bool = False,
                 resize_ratio: float | None = None) -> None:
        self.train_paths, self.train_labels, self.val_paths, self.val_labels, self.classes = labeled_pair(
            train_path, val_path)
        self.k, self.temperature = k, temperature
        self.options = dict(image_size=image_size, mean=tuple(mean), std=tuple(std), batch_size=batch_size,
                            num_workers=num_workers, channels_last=channels_last, resize_ratio=resize_ratio)

    @classmethod
    def from_config(cls, cfg) -> KNNMonitor:
        """The monitor of a training Config's `eval` section (image_size 0 = the training crop size)."""
        e = cfg.eval
        return cls(e.train_path, e.val_path, image_size=e.image_size or cfg.augment.view1.crop_size, k=e.k,
                   temperature=e.temperature, batch_size=e.batch_size, num_workers=e.num_workers,
                   mean=cfg.augment.mean, std=cfg.augment.std, channels_last=cfg.model.channels_last)

    def __call__(self, encoder: nn.Module) -> dict[str, float]:
        """{"knn_top1": %, "knn_top5": %} of `encoder` (called on every rank when distributed)."""
        train_f, train_y = extract_features(encoder, self.train_paths, self.train_labels, **self.options)
        val_f, val_y = extract_features(encoder, self.val_paths, self.val_labels, gather=False, **self.options)
        counts = torch.tensor([0, 0, val_f.shape[0]], dtype=torch.int64, device=train_f.device)
        if val_f.shape[0]:
            c1, c5 = knn_counts(train_f, train_y, val_f, val_y, self.k, self.temperature, len(self.classes))
            counts[0], counts[1] = c1, c5
        c1, c5, m = dist.all_reduce_sum(counts).tolist()
        return {"knn_top1": 100.0 * c1 / m, "knn_top5": 100.0 * c5 / m}


# ---------------------------------------------------------------- linear evaluation and fine-tuning


def _topk_hits(logits: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = ranked == y[:, None]
    return int(hits[:, 0].sum()), int(hits.any(dim=1).sum())


def _sgd(module: nn.Module, lr: float, weight_decay: float) -> torch.optim.SGD:
    """SGD, Nesterov momentum 0.9; weight decay on weights only (biases and BatchNorm excluded)."""
    decay, no_decay = split_decay_params((n, p) for n, p in module.named_parameters() if p.requires_grad)
    return torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}], lr=lr, momentum=0.9, nesterov=True)


def _head(dim: int, num_classes: int, device: torch.device) -> nn.Linear:
    head = nn.Linear(dim, num_classes)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    return head.to(device)


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """A permutation of range(n) from numpy_rng(seed, epoch) in batches; the last, partial batch
    is dropped when there is more than one (steady batch statistics for fine-tuning)."""
    order = numpy_rng(seed, epoch).permutation(n).tolist()
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def _fit(trainable: nn.Module, batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
         logits_of: Callable[[torch.Tensor], torch.Tensor], epochs: int, steps_per_epoch: int, peak_lr: float,
         weight_decay: float, log: Log) -> float:
    """Cross-entropy training of `trainable` with SGD Nesterov and a per-step cosine lr; returns
    the mean loss of the last epoch."""
    optimizer = _sgd(trainable, peak_lr, weight_decay)
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


def _accuracy(batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
              logits_of: Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, float]:
    c1 = c5 = m = 0
    with torch.no_grad():
        for x, y in batches:
            h1, h5 = _topk_hits(logits_of(x), y)
            c1, c5, m = c1 + h1, c5 + h5, m + len(y)
    return 100.0 * c1 / m, 100.0 * c5 / m


@dataclass
class EvalData:
    """A labeled (train, val) pair, the images' size and normalization, and the loader settings."""

    train_paths: list[str]
    train_labels: list[int]
    val_paths: list[str]
    val_labels: list[int]
    classes: list[str]
    image_size: int
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    batch_size: int = 256
    num_workers: int = 4
    channels_last: bool = False
    resize_ratio: float | None = None

    @classmethod
    def from_folders(cls, train_path: str | os.PathLike, val_path: str | os.PathLike, image_size: int,
                     **options) -> EvalData:
        return cls(*labeled_pair(train_path, val_path), image_size=image_size, **options)

    def image_batches(self, paths: Sequence[str], labels: Sequence[int], batches: list[list], train: bool,
                      seed: int, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(normalized input, label) batches on `device`; batches hold indices or (epoch, index) keys."""
        dataset = LabeledImages(paths, labels, self.image_size, train=train, seed=seed, resize_ratio=self.resize_ratio)
        for x, y in _loader(dataset, batches, self.num_workers, device):
            yield _inputs(x, device, self.mean, self.std, self.channels_last), y.to(device, non_blocking=True)

    def val_batches(self, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, b = len(self.val_paths), self.batch_size
        return self.image_batches(self.val_paths, self.val_labels, [list(range(i, min(n, i + b))) for i in range(0, n, b)],
                                  False, 0, device)

    def summary(self) -> dict:
        return {"num_train": len(self.train_paths), "num_val": len(self.val_paths), "num_classes": len(self.classes),
                "image_size": self.image_size, "eval_resize": eval_resize(self.image_size, self.resize_ratio)}


def knn_eval(encoder: nn.Module, data: EvalData, k: int = 20, temperature: float = 0.07) -> dict:
    """The weighted kNN accuracy of `encoder` on `data` as a result dict (percent)."""
    start = time.perf_counter()
    opts = dict(image_size=data.image_size, mean=data.mean, std=data.std, batch_size=data.batch_size,
                num_workers=data.num_workers, channels_last=data.channels_last, resize_ratio=data.resize_ratio)
    train_f, train_y = extract_features(encoder, data.train_paths, data.train_labels, **opts)
    val_f, val_y = extract_features(encoder, data.val_paths, data.val_labels, **opts)
    top1, top5 = knn_accuracy(train_f, train_y, val_f, val_y, k, temperature, len(data.classes))
    return {"protocol": "knn", "top1": top1, "top5": top5, "k": k, "temperature": temperature, **data.summary(),
            "time_s": time.perf_counter() - start}


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
    device = _device_of(encoder)
    peak_lr = lr if lr is not None else 0.2 * data.batch_size / 256
    encoder.eval().requires_grad_(False)
    n, b = len(data.train_paths), data.batch_size
    steps = len(_epoch_batches(n, b, seed, 0))
    if precompute:
        opts = dict(image_size=data.image_size, mean=data.mean, std=data.std, batch_size=b,
                    num_workers=data.num_workers, channels_last=data.channels_last, resize_ratio=data.resize_ratio,
                    normalize=False)
        train_f, train_y = extract_features(encoder, data.train_paths, data.train_labels, **opts)
        val_f, val_y = extract_features(encoder, data.val_paths, data.val_labels, **opts)
        head = _head(train_f.shape[1], len(data.classes), device)

        def train_batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for idx in _epoch_batches(n, b, seed, epoch):
                idx = torch.as_tensor(idx, device=device)
                yield train_f[idx], train_y[idx]

        _fit(head, train_batches, head, epochs, steps, peak_lr, weight_decay, log)
        top1, top5 = _accuracy(((val_f[i:i + b], val_y[i:i + b]) for i in range(0, len(val_f), b)), head)
    else:
        head = _head(encoder.num_features, len(data.classes), device)

        def logits_of(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), _autocast(device):
                f = encoder(x)
            return head(f.float())

        def train_batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            keys = [[(epoch, i) for i in batch] for batch in _epoch_batches(n, b, seed, epoch)]
            return data.image_batches(data.train_paths, data.train_labels, keys, True, seed, device)

        _fit(head, train_batches, logits_of, epochs, steps, peak_lr, weight_decay, log)
        top1, top5 = _accuracy(data.val_batches(device), logits_of)
    return {"protocol": "linear", "variant": PRECOMPUTED if precompute else AUGMENTED, "top1": top1, "top5": top5,
            "epochs": epochs, "lr": peak_lr, "batch_size": b, "weight_decay": weight_decay, "seed": seed,
            **data.summary(), "time_s": time.perf_counter() - start}


def label_subset(paths: Sequence[str], labels: Sequence[int], *, fraction: float | None = None,
                 subset_file: str | os.PathLike | None = None, root: str | os.PathLike | None = None,
                 seed: int = 0) -> list[int]:
    """Sorted indices of a labeled subset of (paths, labels).

    fraction: round(fraction * n_c) images of each class c (at least one), drawn by
    numpy_rng(seed, c) - the same subset for the same seed, whatever else changes.
    subset_file: one image per line (blank lines and # comments ignored), as a path relative to
    `root` or as a bare file name (the form of SimCLR's ImageNet 1% / 10% lists).
    """
    if (fraction is None) == (subset_file is None):
        raise ValueError("label subset: give exactly one of a label fraction or a subset file")
    if subset_file is None:
        if not 0 < fraction <= 1:
            raise ValueError(f"label fraction = {fraction}: expected a value in (0, 1], e.g. 0.01 or 0.1")
        labels_np = np.asarray(labels)
        chosen = []
        for c in np.unique(labels_np):
            members = np.flatnonzero(labels_np == c)
            count = max(1, round(fraction * len(members)))
            chosen += numpy_rng(seed, int(c)).choice(members, count, replace=False).tolist()
        return sorted(chosen)
    lookup: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        lookup.setdefault(os.path.basename(p), []).append(i)
        if root is not None:
            lookup.setdefault(Path(os.path.relpath(p, root)).as_posix(), []).append(i)
    wanted = [line.strip() for line in Path(subset_file).read_text().splitlines()]
    wanted = [w for w in wanted if w and not w.startswith("#")]
    missing = [w for w in wanted if w not in lookup]
    if missing:
        raise ValueError(f"{subset_file}: {len(missing)} of {len(wanted)} entries are not images of the train "
                         f"folder, e.g. {missing[:3]}")
    ambiguous = [w for w in wanted if len(set(lookup[w])) > 1]
    if ambiguous:
        raise ValueError(f"{subset_file}: entries {ambiguous[:3]} name more than one image; use paths relative "
                         "to the train folder")
    return sorted({lookup[w][0] for w in wanted})


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
    device = _device_of(encoder)
    peak_lr = lr if lr is not None else 0.05 * data.batch_size / 256
    paths = [data.train_paths[i] for i in subset]
    labels = [data.train_labels[i] for i in subset]
    b = min(data.batch_size, len(paths))
    if b < 2:
        raise ValueError(f"fine-tuning on {len(paths)} labeled image(s): BatchNorm needs batches of at least 2")
    model = nn.Sequential(encoder, _head(encoder.num_features, len(data.classes), device))
    model.requires_grad_(True)

    def logits_of(x: torch.Tensor) -> torch.Tensor:
        with _autocast(device):
            return model(x)

    def train_batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        keys = [[(epoch, i) for i in batch] for batch in _epoch_batches(len(paths), b, seed, epoch)]
        return data.image_batches(paths, labels, keys, True, seed, device)

    model.train()
    _fit(model, train_batches, logits_of, epochs, len(_epoch_batches(len(paths), b, seed, 0)), peak_lr,
         weight_decay, log)
    model.eval()
    top1, top5 = _accuracy(data.val_batches(device), logits_of)
    return {"protocol": "finetune", "variant": AUGMENTED, "top1": top1, "top5": top5, "num_labeled": len(paths),
            "label_fraction": len(paths) / len(data.train_paths), "epochs": epochs, "lr": peak_lr, "batch_size": b,
            "weight_decay": weight_decay, "seed": seed, **data.summary(), "time_s": time.perf_counter() - start}


# ---------------------------------------------------------------- encoders and results on disk


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
    from fastbyol.export import EncoderState, build_encoder, encoder_state, infer_architecture
    from fastbyol.models.resnet import resnet

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


def default_result_path(source: str | os.PathLike, name: str) -> Path:
    """Where a result goes by default: RUN_DIR/eval_<name>.json, or <file stem>_eval_<name>.json."""
    source = Path(source)
    if source.is_dir():
        return source / f"eval_{name}.json"
    return source.with_name(f"{source.stem}_eval_{name}.json")


def write_result(result: dict, path: str | os.PathLike) -> Path:
    """Write `result` as indented JSON, atomically (a temporary file renamed over `path`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


__all__ = ["EvalData", "KNNMonitor", "LabeledImages", "LoadedEncoder", "center_view", "default_result_path",
           "extract_features", "finetune", "knn_accuracy", "knn_counts", "knn_eval", "label_subset",
           "labeled_pair", "linear_eval", "load_encoder", "random_view", "eval_resize", "write_result"]
