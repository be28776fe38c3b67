"""The quickstart's demo data: a small labeled ImageFolder of shapes on textured backgrounds.

Each class is a shape (circle, square, triangle, ...) drawn upright at a random position and
scale, lighter than a noisy gray background of random brightness, so that the class is told by
the shape, never by colour. Writing is deterministic given the seed, idempotent (a marker file records a
complete dataset) and atomic (written to a temporary folder, then renamed).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipelines.seeding import numpy_rng

SHAPES = (
    "circle", "square", "triangle", "ring", "cross",
    "stripes", "checker", "star", "crescent", "dots",
)
SPLITS = ("train", "val")  # the split's position is a seed key: train and val never share images
MARKER = ".fastbyol_demo.json"  # written last: its presence means the dataset is complete
MASK_SIDE = 128  # shapes are drawn at this resolution, then downsampled (antialiased)
JPEG_QUALITY = 90


def _polygon(n: int, radius: float, c: float, phase: float = -math.pi / 2) -> list:
    """n vertices on a circle of `radius` around (c, c), the first at angle `phase`."""
    return [(c + radius * math.cos(phase + 2 * math.pi * i / n),
             c + radius * math.sin(phase + 2 * math.pi * i / n)) for i in range(n)]


def shape_mask(shape: str, side: int = MASK_SIDE) -> Image.Image:
    """A mode "L" mask (side x side) of `shape` centered, 255 inside, 0 outside."""
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    c, r = side / 2, side * 0.45

    def box(half: float) -> tuple[float, float, float, float]:
        return c - half, c - half, c + half, c + half

    if shape == "circle":
        draw.ellipse(box(r), fill=255)
    elif shape == "square":
        draw.rectangle(box(0.75 * r), fill=255)
    elif shape == "triangle":
        draw.polygon(_polygon(3, r, c), fill=255)
    elif shape == "ring":
        draw.ellipse(box(r), fill=255)
        draw.ellipse(box(0.55 * r), fill=0)
    elif shape == "cross":
        draw.rectangle((c - 0.2 * r, c - r, c + 0.2 * r, c + r), fill=255)
        draw.rectangle((c - r, c - 0.2 * r, c + r, c + 0.2 * r), fill=255)
    elif shape == "stripes":
        half = 0.8 * r
        band = 2 * half / 5
        for i in range(0, 5, 2):
            y = c - half + i * band
            draw.rectangle((c - half, y, c + half, y + band), fill=255)
    elif shape == "checker":
        half = 0.8 * r
        cell = 2 * half / 4
        for i in range(4):
            for j in range(i % 2, 4, 2):
                x, y = c - half + j * cell, c - half + i * cell
                draw.rectangle((x, y, x + cell, y + cell), fill=255)
    elif shape == "star":
        outer, inner = _polygon(5, r, c), _polygon(5, 0.4 * r, c, -math.pi / 2 + math.pi / 5)
        draw.polygon([p for pair in zip(outer, inner) for p in pair], fill=255)
    elif shape == "crescent":
        draw.ellipse(box(r), fill=255)
        draw.ellipse((c - 0.35 * r, c - 0.85 * r, c + 1.35 * r, c + 0.85 * r), fill=0)
    elif shape == "dots":
        for dy in (-0.6, 0.0, 0.6):
            for dx in (-0.6, 0.0, 0.6):
                x, y = c + dx * r, c + dy * r
                draw.ellipse((x - 0.22 * r, y - 0.22 * r, x + 0.22 * r, y + 0.22 * r), fill=255)
    else:
        raise ValueError(f"shape = {shape!r}: expected one of {', '.join(SHAPES)}")
    return mask


def render(shape_base: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
    """One (size, size, 3) uint8 gray image: `shape_base` (an "L" mask), upright, scaled and placed
    at random, lighter than its darker background of random brightness, plus noise.

    The nuisances are the ones BYOL's views vary (brightness, contrast, position, scale), so the
    pretraining can learn to ignore them; a class is told by its shape only. A nuisance the views
    cannot vary is shared by both, and a short run learns it instead of the shape: random colours
    (kNN 8.5 % trained vs 14 % untrained), a faint random tint (17 % vs 45 %), a rotation within
    30 degrees (40.0 % vs 41.5 %); upright and gray: 60.5 % vs 52.5 % (200 val images, trust
    coefficient 5e-3). A flat background (no blotches) did not help (47.6 % vs 54.8 %, 500 val
    images, 5e-3); nor did wider brightness, contrast and scale ranges (27.4 % vs 41.2 %). What
    made the gain clear was the trust coefficient (configs/quickstart.yaml, README: "Two commands").
    """
    background = rng.uniform(0.1, 0.45)
    foreground = background + rng.uniform(0.3, 0.5)
    # Soft brightness blotches (a 4x4 grid upsampled) so the background is not flat
    blotches = np.clip(128 + rng.normal(0, 20, (4, 4)), 0, 255).astype(np.uint8)
    shade = np.asarray(Image.fromarray(blotches).resize((size, size), Image.Resampling.BICUBIC),
                       dtype=np.float32)[..., None] / 128.0 - 1.0

    side = max(4, int(round(size * rng.uniform(0.45, 0.85))))
    mask = shape_base.resize((side, side), Image.Resampling.LANCZOS)  # upright: see the docstring
    top, left = (int(rng.integers(0, size - side + 1)) for _ in range(2))
    alpha = np.zeros((size, size, 1), np.float32)
    alpha[top:top + side, left:left + side, 0] = np.asarray(mask, np.float32) / 255
    level = background * (1 - alpha) + foreground * alpha + 0.1 * shade
    canvas = np.repeat(255 * level, 3, axis=2) + rng.normal(0, 8, (size, size, 1))  # gray: no colour at all
    return np.clip(canvas, 0, 255).astype(np.uint8)


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def make_demo_dataset(
    root: str | os.PathLike,
    num_classes: int = 10,
    images_per_class: int = 100,
    size: int = 64,
    seed: int = 0,
    split: str = "train",
) -> Path:
    """Write the demo ImageFolder at root/<split> and return that path.

    root/<split>/<NN_shape>/<NNNNN>.jpg: `num_classes` classes (at most len(SHAPES)) of
    `images_per_class` JPEGs of size x size pixels. If the folder already holds a complete demo
    dataset with the same parameters it is returned untouched; a folder that is not a demo
    dataset is never overwritten.
    """
    if split not in SPLITS:
        raise ValueError(f"split = {split!r}: expected one of {', '.join(SPLITS)}")
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(
            f"num_classes = {num_classes}: expected 1 to {len(SHAPES)} (one class per shape)"
        )
    if images_per_class < 1:
        raise ValueError(f"images_per_class = {images_per_class}: expected >= 1")
    if size < 16:
        raise ValueError(f"size = {size}: expected at least 16 pixels")
    target = Path(root).expanduser() / split
    params = {"num_classes": num_classes, "images_per_class": images_per_class, "size": size,
              "seed": seed, "split": split, "version": 4}
    if _read_marker(target) == params:
        return target
    if target.exists() and _read_marker(target) is None and any(target.iterdir()):
        raise FileExistsError(
            f"{target} exists and is not a fastbyol demo dataset (no {MARKER}); not overwriting it"
        )

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{split}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the dataset should be readable like any
    try:
        _write(tmp, params)
        if target.exists():  # an empty folder or a demo dataset with other parameters
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if _read_marker(target) != params:  # not another process finishing the same job
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _write(folder: Path, params: dict) -> None:
    split_key = SPLITS.index(params["split"])
    for label in range(params["num_classes"]):
        shape = SHAPES[label]
        class_dir = folder / f"{label:02d}_{shape}"
        class_dir.mkdir()
        base = shape_mask(shape)
        for i in range(params["images_per_class"]):
            rng = numpy_rng(params["seed"], split_key, label, i)
            pixels = render(base, params["size"], rng)
            Image.fromarray(pixels).save(class_dir / f"{i:05d}.jpg", quality=JPEG_QUALITY)
    (folder / MARKER).write_text(json.dumps(params))


def make_demo_splits(
    root: str | os.PathLike,
    num_classes: int = 10,
    train_per_class: int = 100,
    val_per_class: int = 50,
    size: int = 64,
    seed: int = 0,
) -> dict[str, Path]:
    """Both demo splits under `root`: {"train": root/train, "val": root/val}."""
    return {
        "train": make_demo_dataset(root, num_classes, train_per_class, size, seed, "train"),
        "val": make_demo_dataset(root, num_classes, val_per_class, size, seed, "val"),
    }
