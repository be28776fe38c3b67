"""The data paths end to end: photo-like JPEGs written on the node, `fastbyol convert` to a .beton,
then `fastbyol profile` of each backend (loader alone, model alone, end to end, and the verdict).

End-to-end over model-only is how well a loader hides itself (goal: >= 0.97).
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

from benchmarks.suite.context import Context
from fastbyol import cli
from fastbyol.config import ConfigError
from fastbyol.profile import profile


def write_photo_like(root: Path, count: int, hw: tuple[int, int], workers: int) -> dict:
    """`count` photo-like JPEGs (smooth colour fields, shapes with edges, texture, grain: ~105 KB at
    400x500) in an ImageFolder of 10 classes under `root`; idempotent (a marker file). Their stats."""
    marker = root / "written.json"
    if marker.exists():
        return json.loads(marker.read_text())
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(root / f"class_{i % 10}" / f"img_{i:05d}.jpg", i, hw) for i in range(count)]
    for d in {j[0].parent for j in jobs}:
        d.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max(1, workers)) as pool:
        sizes = list(pool.map(_write_one, jobs, chunksize=16))
    stats = {"images": count, "height": hw[0], "width": hw[1], "mean_kb": sum(sizes) / len(sizes) / 1024}
    marker.write_text(json.dumps(stats))
    return stats


def _write_one(job: tuple[Path, int, tuple[int, int]]) -> int:
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    path, seed, (h, w) = job
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (max(2, h // 80), max(2, w // 80), 3), dtype=np.uint8)  # low-frequency colour
    img = Image.fromarray(base).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(15, 40)):  # objects with hard edges, large and small, as photos have
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        box = (x0, y0, x0 + rng.integers(w // 40, w // 3), y0 + rng.integers(h // 40, h // 3))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 1.5))))
    texture = rng.normal(0, 30, (max(2, h // 2), max(2, w // 2), 1)).astype(np.float32)  # foliage, fabric
    texture = np.asarray(Image.fromarray(texture[..., 0], mode="F").resize((w, h), Image.BICUBIC))[..., None]
    grain = rng.normal(0, 13, (h, w, 3))  # sensor noise
    pixels = np.clip(np.asarray(img, dtype=np.float32) + texture + grain, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path.stat().st_size


def _profile_backends(ctx: Context, backends: tuple[str, ...]) -> dict[str, Any]:
    """`fastbyol profile` of each backend on the written images: three figures and the verdict."""
    s, work = ctx.sizes, ctx.work
    images = work / "images"
    result: dict[str, Any] = {"images": write_photo_like(images, s.images, s.image_hw, s.workers),
                              "batch": s.batch, "backends": {}}
    ctx.save(result)
    beton = work / "images.beton"
    if "ffcv" in backends and importlib.util.find_spec("ffcv") is None:
        result["backends"]["ffcv"] = {"error": "ffcv is not installed (bash tools/install_ffcv.sh)"}
        backends = tuple(b for b in backends if b != "ffcv")
    if "ffcv" in backends and not beton.exists():
        t = time.perf_counter()
        code = cli.main(["convert", str(images), str(beton), "--max-res", str(s.max_res),
                         "--workers", str(s.workers), "--no-progress"])
        result["convert"] = {"exit_code": code, "seconds": time.perf_counter() - t,
                             "beton_mb": beton.stat().st_size / 2**20 if beton.exists() else None}
        ctx.save(result)
    config = work / "suite.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "data": {"batch_size": s.batch, "num_workers": s.workers},
        "augment": {"view1": {"crop_size": s.size}, "view2": {"crop_size": s.size}},
        "model": {"depth": s.depth, "stem": s.stem},
        "byol": {"hidden_dim": s.hidden, "proj_dim": s.proj},
        "train": {"device": ctx.device, "precision": ctx.precision, "run_dir": str(work / "run")}}))
    for backend in backends:
        path = beton if backend == "ffcv" else images
        try:
            report = profile(config, [f"data.backend={backend}", f"data.path={path}"], s.loader_steps, s.warmup)
            run = report["runs"][0]
            result["backends"][backend] = {k: run[k] for k in ("end_to_end_over_model", "loader_over_model",
                                                               "optimizer_ema_share", "verdict", "evidence")}
            for figure in ("loader", "model", "end_to_end"):
                result["backends"][backend][figure] = run[figure]["images_per_sec"]
        except (ConfigError, ImportError, OSError, RuntimeError) as e:  # one backend's failure, in one line
            result["backends"][backend] = {"error": str(e).splitlines()[0][:300]}
        ctx.save(result)
    return result


def loader(ctx: Context) -> dict[str, Any]:
    """Run A: the folder and ffcv backends."""
    return _profile_backends(ctx, ("folder", "ffcv"))


def dali(ctx: Context) -> dict[str, Any]:
    """Run B: the DALI backend, when nvidia.dali imports (all of --dali-parts brought and installed)."""
    if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
        return {"skipped": "nvidia.dali is not installed (bring all --dali-parts to install it)"}
    return _profile_backends(ctx, ("dali",))
