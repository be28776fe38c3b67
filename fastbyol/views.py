"""views.png: a few source images beside the two views the configured backend made of them.

The views are the tensors the model is fed (normalized, on the device), taken back to pixels
with the policy's mean and std, so the picture shows what the real pipeline did on every backend
(folder, ffcv, dali; synthetic has views only). `fastbyol train` writes it into the run directory
at the start of a run (rank 0, the first batch the run trains on); `fastbyol views CONFIG` writes
the same picture of epoch 0's first batch without training.

Layout: one column per image; rows: the source as stored (fitted into the cell), view 1, view 2.
Views smaller than MIN_CELL pixels are enlarged by a whole factor, nearest neighbour, so each
pixel the model sees stays a visible square.
"""

from __future__ import annotations

import argparse
import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

import pipelines
from fastbyol.atomic import atomic_write
from fastbyol.config import load_config
from fastbyol.dist import resolve_device

COUNT = 8  # images shown
MIN_CELL = 96  # pixels: smaller views are enlarged by a whole factor
GAP = 2  # pixels between cells
LABEL_WIDTH = 56  # the row names' column
BACKGROUND = (40, 40, 40)


def view_pixels(view: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(B, 3, S, S) normalized views -> (B, S, S, 3) uint8: x * std + mean, in [0, 255], rounded."""
    x = view.detach().float().cpu()
    x = x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def cell_size(view_side: int) -> int:
    """The side of one cell: the view's side times the smallest whole factor reaching MIN_CELL."""
    return view_side * max(1, math.ceil(MIN_CELL / view_side))


def _fit(image: np.ndarray, side: int) -> Image.Image:
    """`image` scaled to fit a side x side cell (aspect kept), centred on the background."""
    source = Image.fromarray(image)
    scale = side / max(source.size)
    size = (max(1, round(source.width * scale)), max(1, round(source.height * scale)))
    cell = Image.new("RGB", (side, side), BACKGROUND)
    cell.paste(source.resize(size, Image.Resampling.BICUBIC), ((side - size[0]) // 2, (side - size[1]) // 2))
    return cell


def views_picture(view1: torch.Tensor, view2: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                  sources: list[np.ndarray] | None = None, count: int = COUNT) -> Image.Image:
    """The grid: the first `count` images of the batch, a column each; rows source (when given),
    view 1, view 2."""
    views = [view_pixels(v[:count], mean, std) for v in (view1, view2)]
    n, side = len(views[0]), views[0].shape[1]
    cell = cell_size(side)
    rows: list[tuple[str, list[Image.Image]]] = []
    if sources is not None:
        rows.append(("source", [_fit(s, cell) for s in sources[:n]]))
    for name, pixels in zip(("view 1", "view 2"), views):
        rows.append((name, [Image.fromarray(p).resize((cell, cell), Image.Resampling.NEAREST) for p in pixels]))
    width = LABEL_WIDTH + n * (cell + GAP)
    picture = Image.new("RGB", (width, len(rows) * (cell + GAP)), BACKGROUND)
    draw = ImageDraw.Draw(picture)
    for r, (name, cells) in enumerate(rows):
        top = r * (cell + GAP)
        draw.text((4, top + cell // 2 - 5), name, fill=(230, 230, 230))
        for c, image in enumerate(cells):
            picture.paste(image, (LABEL_WIDTH + c * (cell + GAP), top))
    return picture


def grid_cells(picture: Image.Image, view_side: int, count: int, row: int) -> list[np.ndarray]:
    """The cells of row `row` of a views_picture, each shrunk back to the view's side (the
    nearest-neighbour enlargement undone): what a test compares with the views."""
    cell = cell_size(view_side)
    step = cell // view_side
    out = []
    for c in range(count):
        left, top = LABEL_WIDTH + c * (cell + GAP), row * (cell + GAP)
        out.append(np.asarray(picture)[top:top + cell:step, left:left + cell:step])
    return out


def write_png(picture: Image.Image, path: str | Path) -> Path:
    """`picture` as a PNG at `path`, written atomically."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return atomic_write(path, lambda f: f.write(buffer.getvalue()))


def batch_picture(loader: object, batch: object, epoch: int, step: int, mean: Sequence[float],
                  std: Sequence[float], count: int = COUNT) -> Image.Image:
    """views_picture of `batch` (batch `step` of `epoch` from `loader`), with the loader's source
    images when it reads stored images (pipelines.loader.HasSources)."""
    sources = loader.sources(epoch, step, count) if hasattr(loader, "sources") else None
    return views_picture(batch.view1, batch.view2, mean, std, sources, count)


def write_views(config: str, overrides: list[str], out: str | Path, count: int = COUNT) -> Path:
    """`fastbyol views`: the picture of epoch 0's first batch of `config`, at `out`; no training."""
    cfg = load_config(config, overrides)
    device = resolve_device(cfg.train.device)
    loader = pipelines.build_loader(cfg.data, cfg.augment, device, 0, 1, cfg.train.seed)
    batches = loader.epoch(0)
    try:
        batch = next(iter(batches))
        picture = batch_picture(loader, batch, 0, 0, cfg.augment.mean, cfg.augment.std, count)
    finally:
        close = getattr(batches, "close", None)  # a generator: stops the backend's workers now
        if close is not None:
            close()
    return write_png(picture, out)


def add_views_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="a.b.c=value overrides of config keys")
    parser.add_argument("--out", default="views.png", help="where to write the picture (default: views.png)")
    parser.add_argument("--count", type=int, default=COUNT, help=f"images shown (default {COUNT})")


__all__ = ["COUNT", "add_views_arguments", "batch_picture", "cell_size", "grid_cells", "view_pixels",
           "views_picture", "write_png", "write_views"]
