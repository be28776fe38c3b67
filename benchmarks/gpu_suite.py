"""One command measures fastbyol on a GPU: ceiling, model-only step options, peers, loader hidden.

    python benchmarks/gpu_suite.py --out results/suite                     # GPU node, <= 9 minutes
    python benchmarks/gpu_suite.py --device cpu --tiny --out /tmp/suite    # every stage, tiny, < 1 min

First it installs the offline wheelhouse (tools/wheelhouse.sh; `--wheelhouse`, default
.wheelhouse/core) with `pip install --no-index --no-deps --target WORK/site`, so the node's torch
is never touched, and joins + installs DALI when all its parts are in `--dali-parts`. Then every
stage runs in its own process with its own time budget (a stage that hangs or crashes costs only
its budget) and appends one JSON line to OUT/results.jsonl when it ends; a killed stage keeps
what it had measured (partial results are saved after every measurement). OUT/results.md is the
Markdown table of all finished stages.

Stages (all timings reuse the project's own harnesses: benchmarks/peers.py for training steps,
benchmarks/fused_ops.py for LARS/EMA, fastbyol.profile for loader / model / end-to-end):
  environment  GPU, driver, torch / CUDA / cuDNN, CPU count, package versions
  ceiling      supervised ResNet step (one view, forward + backward, SGD), bf16, channels_last,
               eager and compiled: BYOL costs ~8/3 of it per image, so 3/8 of it is the bar
  model        fastbyol model-only: eager / concat_views / compile / compile with CUDA graphs
               (model.compile_mode=reduce-overhead) / DDP over one rank with and without
               dist.gradient_as_bucket_view (and its grad-stride warnings), more batch sizes if time
               allows, peak memory,
               host syncs inside a step, LARS + EMA share of the step (foreach vs per-parameter loop)
  peers        fastbyol vs lightly vs byol-pytorch, the same step, alternated rounds
  loader       photo-like JPEGs written on the node, `fastbyol convert`, `fastbyol profile` for the
               folder and ffcv backends: end-to-end vs model-only, with the profiler's verdict
  dali         the same for DALI (last, optional: only when nvidia.dali imports)
`--tiny` shrinks every size (ResNet-18 cifar stem, 16 px, batch 4, 16 images) and skips the
compiled variants (compilation takes minutes on a CPU): the suite cannot rot between GPU rounds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
STAGES = ("environment", "ceiling", "model", "peers", "loader", "dali")
BUDGET_S = {"environment": 30, "ceiling": 80, "model": 150, "peers": 70, "loader": 140, "dali": 50}
TOTAL_S = 530  # the whole suite, install included: one 10-minute command with a margin
INSTALL_S = 60
RECORD_KEYS = ("run", "stage", "status", "seconds", "budget_s", "result", "error")
BYOL_COST = 8 / 3  # a BYOL image: 2 views x (online fwd+bwd + target fwd) ~ 8/3 of a supervised image


@dataclass(frozen=True)
class Sizes:
    """Everything the stages size by: the GPU defaults, or `TINY` for a CPU smoke run."""

    depth: int = 50
    stem: str = "imagenet"
    size: int = 224  # view side, px
    batch: int = 256
    extra_batches: tuple[int, ...] = (128, 512)  # eager model-only, if the stage budget allows
    hidden: int = 4096
    proj: int = 256
    steps: int = 20  # timed steps per window
    peer_steps: int = 10  # timed steps per contender per round in the peers stage (4 contenders)
    warmup: int = 5
    rounds: int = 3
    compile: bool = True  # the compiled variants (ceiling, model)
    images: int = 3000  # JPEGs written for the loader stages
    image_hw: tuple[int, int] = (400, 500)
    max_res: int = 256  # fastbyol convert --max-res
    workers: int = 16
    fused_repeats: int = 50


TINY = Sizes(depth=18, stem="cifar", size=16, batch=4, extra_batches=(), hidden=32, proj=16, steps=2, peer_steps=2,
             warmup=1, rounds=1, compile=False, images=16, image_hw=(40, 48), max_res=32, workers=1, fused_repeats=2)


# ---------------------------------------------------------------- shared helpers


def _rate(step: Callable[[], Any], batch: int, sizes: Sizes, device: Any) -> float:
    """Median images/sec over `rounds` windows of `steps` calls, after `warmup` calls (peers.time_window)."""
    from peers import time_window

    for _ in range(sizes.warmup):
        step()
    return statistics.median(batch * sizes.steps / time_window(step, sizes.steps, device)
                             for _ in range(sizes.rounds))


def _peers_settings(sizes: Sizes, device: str, contenders: tuple[str, ...], overrides: tuple[str, ...] = (),
                    batch: int | None = None, steps: int | None = None) -> Any:
    from peers import Settings

    return Settings(depth=sizes.depth, stem=sizes.stem, size=sizes.size, batch=batch or sizes.batch,
                    hidden=sizes.hidden, proj=sizes.proj, steps=steps or sizes.steps, warmup=sizes.warmup,
                    rounds=sizes.rounds, device=device, contenders=contenders, fastbyol_overrides=overrides)


# ---------------------------------------------------------------- stages (each runs in its own process)


def stage_environment(sizes: Sizes, device: str, work: Path, save: Callable[[dict], None]) -> dict:
    import torch

    from fastbyol.profile import machine_info
    from peers import machine_info as peer_versions

    dev = torch.device(device)
    info = {**machine_info(dev), "cudnn": torch.backends.cudnn.version() if dev.type == "cuda" else None,
            "packages": peer_versions(dev)["packages"], "driver": None}
    if dev.type == "cuda":
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True)
        info["driver"] = smi.stdout.strip() or smi.stderr.strip()
    save(info)  # the table's header line, even if an import below hangs
    for module in ("ffcv", "nvidia.dali", "lightly", "byol_pytorch", "torchvision"):
        try:
            __import__(module)
            info[f"imports_{module}"] = "ok"
        except Exception as e:  # a broken install must show here, not as a crash later
            info[f"imports_{module}"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    return info


def stage_ceiling(sizes: Sizes, device: str, work: Path, save: Callable[[dict], None]) -> dict:
    """Supervised ResNet step images/sec: the physical bar for one view forward + backward."""
    import torch
    from torch import nn

    from fastbyol.models.resnet import resnet

    dev = torch.device(device)
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    encoder = resnet(sizes.depth, 1, sizes.stem)
    model = nn.Sequential(encoder, nn.Linear(encoder.num_features, 1000)).to(dev, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(sizes.batch, 3, sizes.size, sizes.size, device=dev).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (sizes.batch,), device=dev)
    dtype = torch.bfloat16 if dev.type == "cuda" else None  # bf16 autocast is far slower than fp32 on CPUs

    def step_of(net: nn.Module) -> Callable[[], None]:
        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
                loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
        return step

    result: dict[str, Any] = {"model": f"ResNet-{sizes.depth} ({sizes.stem} stem) + Linear(1000), SGD momentum",
                              "batch": sizes.batch, "size": sizes.size, "channels_last": True,
                              "precision": "bf16" if dtype else "fp32", "images_per_sec": {}}
    result["images_per_sec"]["eager"] = _rate(step_of(model), sizes.batch, sizes, dev)
    save(result)
    if sizes.compile:
        result["images_per_sec"]["compiled"] = _rate(step_of(torch.compile(model)), sizes.batch, sizes, dev)
    else:
        result["skipped"] = "compiled: --tiny"
    best = max(result["images_per_sec"].values())
    result.update(best=best, byol_bar=best / BYOL_COST)
    return result


def _model_variants(sizes: Sizes) -> list[tuple[str, tuple[str, ...], int]]:
    """(name, fastbyol overrides, batch), most telling first: a stage cut by its budget keeps those."""
    variants = [("eager", (), sizes.batch), ("concat_views", ("byol.concat_views=true",), sizes.batch),
                ("ddp 1 rank", ("dist.gradient_as_bucket_view=false",), sizes.batch),
                ("ddp 1 rank, gradient_as_bucket_view", ("dist.gradient_as_bucket_view=true",), sizes.batch)]
    if sizes.compile:  # each compilation takes a minute or more: after the quick variants
        variants += [("compile", ("model.compile=true",), sizes.batch),
                     ("compile+cudagraphs", ("model.compile=true", "model.compile_mode=reduce-overhead"),
                      sizes.batch)]
    variants += [("eager", (), b) for b in sizes.extra_batches]
    return variants


def stage_model(sizes: Sizes, device: str, work: Path, save: Callable[[dict], None]) -> dict:
    """fastbyol's step alone on synthetic views: each variant, peak memory, syncs, LARS + EMA share."""
    import peers
    import torch

    dev = torch.device(device)
    result: dict[str, Any] = {"variants": [], "skipped": [] if sizes.compile else ["compiled variants: --tiny"]}
    for name, overrides, batch in _model_variants(sizes):
        try:
            if name.startswith("ddp"):
                row = _ddp_one_rank(sizes, dev, work, overrides)
            else:
                row = peers.run(_peers_settings(sizes, device, ("fastbyol",), overrides, batch))["contenders"][0]
            keys = ("images_per_sec", "step_ms", "peak_memory_bytes", "stride_warnings")
            result["variants"].append({"name": name, "batch": batch, "overrides": list(overrides),
                                       **{k: row[k] for k in keys if k in row}})
        except Exception as e:  # one broken option must not hide the others
            result["variants"].append({"name": name, "batch": batch, "overrides": list(overrides),
                                       "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]})
        if dev.type == "cuda":
            torch.cuda.empty_cache()  # the next variant starts from the same free memory
        save(result)
        if name == "concat_views":  # the cheap checks next, before the long compilations
            result["host_syncs"] = _host_syncs(sizes, device)
            result["fused_ops"] = _fused_share(sizes, dev, result["variants"][0])
            save(result)
    return result


def _ddp_one_rank(sizes: Sizes, dev: Any, work: Path, overrides: tuple[str, ...]) -> dict:
    """fastbyol's step wrapped in DDP over a process group of one rank (NCCL on a GPU): the cost of
    DDP's buckets and SyncBatchNorm on one device, and DDP's "grad strides do not match bucket view
    strides" warnings under channels_last, each variant's own (warn-always)."""
    import warnings

    import torch
    import torch.distributed as tdist

    from fastbyol import dist
    from fastbyol.config import load_config
    from fastbyol.train import build_components, train_step
    from pipelines.synthetic import random_batch

    class OneRank(dist.DistInfo):
        enabled = True  # a real DDP wrap although the group has one rank

    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())  # DDP's device_ids need the index

    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=0, world_size=1,
                                 init_method=f"file://{work / f'ddp-store-{os.getpid()}'}",
                                 device_id=dev if dev.type == "cuda" else None)
    cfg = load_config(None, ["data.backend=synthetic", f"data.batch_size={sizes.batch}", f"model.depth={sizes.depth}",
                             f"model.stem={sizes.stem}", f"byol.hidden_dim={sizes.hidden}",
                             f"byol.proj_dim={sizes.proj}",
                             f"train.precision={'bf16' if dev.type == 'cuda' else 'fp32'}", *overrides])
    c = build_components(cfg, dev, OneRank(), cfg.optim.peak_lr(sizes.batch))
    views = random_batch(sizes.batch, sizes.size, dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    torch.set_warn_always(True)  # DDP warns once per process: every variant must show its own
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rate = _rate(lambda: train_step(c, views.view1, views.view2, 0.1, 0.99), sizes.batch, sizes, dev)
    finally:
        torch.set_warn_always(False)
    strides = sorted({str(w.message).splitlines()[0][:200] for w in caught if "stride" in str(w.message).lower()})
    return {"images_per_sec": rate, "step_ms": 1e3 * sizes.batch / rate, "stride_warnings": strides,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None}


def _host_syncs(sizes: Sizes, device: str) -> str:
    """'none' if one fastbyol step runs under torch.cuda.set_sync_debug_mode('error'), else the error."""
    import peers
    import torch

    if not device.startswith("cuda"):
        return "not checked on cpu (tests/test_step_options.py forbids host conversions instead)"
    settings = _peers_settings(replace(sizes, batch=min(sizes.batch, 32)), device, ("fastbyol",))
    contender, _ = peers.build_fastbyol(settings, "bf16", torch.device(device))
    contender.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        contender.step()
        return "none"
    except RuntimeError as e:
        return str(e).splitlines()[0][:300]
    finally:
        torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()


def _fused_share(sizes: Sizes, dev: Any, eager: dict) -> dict:
    """LARS step + target EMA ms, foreach vs per-parameter loop, and their share of the eager step."""
    import fused_ops

    m = fused_ops.measure(dev, sizes.fused_repeats, 3, sizes.depth, hidden=sizes.hidden, proj=sizes.proj)
    out = {**m}
    step_ms = eager.get("step_ms")
    if step_ms:
        for variant in ("foreach", "per-param loop"):
            out[f"share_{variant}"] = (m["lars_ms"][variant] + m["ema_ms"][variant]) / step_ms
    return out


def stage_peers(sizes: Sizes, device: str, work: Path, save: Callable[[dict], None]) -> dict:
    import peers

    return peers.run(_peers_settings(sizes, device, ("fastbyol", "fastbyol-concat", "lightly", "byol-pytorch"),
                                     steps=sizes.peer_steps))


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


def _profile_backends(sizes: Sizes, device: str, work: Path, backends: tuple[str, ...],
                      save: Callable[[dict], None]) -> dict:
    """`fastbyol profile` of each backend on the written images: three figures and the verdict."""
    from fastbyol.config import ConfigError
    from fastbyol.profile import profile

    images = work / "images"
    result: dict[str, Any] = {"images": write_photo_like(images, sizes.images, sizes.image_hw, sizes.workers),
                              "backends": {}}
    save(result)
    beton = work / "images.beton"
    if "ffcv" in backends and not beton.exists():
        from fastbyol import cli

        t = time.perf_counter()
        code = cli.main(["convert", str(images), str(beton), "--max-res", str(sizes.max_res),
                         "--workers", str(sizes.workers), "--no-progress"])
        result["convert"] = {"exit_code": code, "seconds": time.perf_counter() - t,
                             "beton_mb": beton.stat().st_size / 2**20 if beton.exists() else None}
        save(result)
    config = work / "suite.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "data": {"batch_size": sizes.batch, "num_workers": sizes.workers},
        "augment": {"view1": {"crop_size": sizes.size}, "view2": {"crop_size": sizes.size}},
        "model": {"depth": sizes.depth, "stem": sizes.stem},
        "byol": {"hidden_dim": sizes.hidden, "proj_dim": sizes.proj},
        "train": {"device": device, "precision": "bf16" if device.startswith("cuda") else "fp32",
                  "run_dir": str(work / "run")}}))
    for backend in backends:
        path = beton if backend == "ffcv" else images
        try:
            report = profile(config, [f"data.backend={backend}", f"data.path={path}"], sizes.steps, sizes.warmup)
            run = report["runs"][0]
            result["backends"][backend] = {k: run[k] for k in ("end_to_end_over_model", "loader_over_model",
                                                               "optimizer_ema_share", "verdict", "evidence")}
            for figure in ("loader", "model", "end_to_end"):
                result["backends"][backend][figure] = run[figure]["images_per_sec"]
        except (ConfigError, ImportError, RuntimeError) as e:
            result["backends"][backend] = {"error": str(e).splitlines()[0][:300]}
        save(result)
    return result


def stage_loader(sizes: Sizes, device: str, work: Path, save: Callable[[dict], None]) -> dict:
    return _profile_backends(sizes, device, work, ("folder", "ffcv"), save)


def stage_dali(sizes: Sizes, device: str, work: Path, save: Callable[[dict], None]) -> dict:
    if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
        return {"skipped": "nvidia.dali is not installed (bring all --dali-parts to install it)"}
    return _profile_backends(sizes, device, work, ("dali",), save)


STAGE_FUNCTIONS = {name: globals()[f"stage_{name}"] for name in STAGES}


# ---------------------------------------------------------------- install (the parent process)


def install(wheelhouse: Path, dali_parts: Path, site: Path) -> dict:
    """pip-install the wheelhouse's wheels (fastbyol's own aside: it runs from this tree) and, when
    every part is present and its checksum matches, DALI's, into `site`, never into the node's Python."""
    result: dict[str, Any] = {"site": str(site), "wheels": [], "dali": None}
    wheels = sorted(w for w in wheelhouse.glob("*.whl") if not w.name.startswith("fastbyol-"))
    if not wheels:
        result["note"] = f"no wheels in {wheelhouse}: the stages use what this Python already has"
    dali = _joined_dali(dali_parts, site.parent / "dali")
    result["dali"] = dali["status"]
    wheels += dali.get("wheels", [])
    if wheels and _pip_install(wheels, site):  # one wheel pip refuses (e.g. an older glibc) must not
        failed = {w.name: _pip_install([w], site) for w in wheels}  # cost the others: then one by one
        result["failed"] = {name: error for name, error in failed.items() if error}
    result["wheels"] = [w.name for w in wheels if w.name not in result.get("failed", {})]
    nvidia = site / "nvidia" / "__init__.py"
    if nvidia.exists():
        # DALI's wheels make `nvidia` a regular package; first on PYTHONPATH it would hide the node's
        # own nvidia.* (CUDA libraries). A pkgutil namespace spans every nvidia/ folder on sys.path.
        nvidia.write_text("__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n")
    return result


def _pip_install(wheels: list[Path], site: Path) -> str:
    """'' if pip installed `wheels` into `site` (no index, no dependencies), else pip's last error lines."""
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                          "--disable-pip-version-check", "--upgrade", "--target", str(site), *map(str, wheels)],
                         capture_output=True, text=True)
    return "" if pip.returncode == 0 else " | ".join(pip.stderr.strip().splitlines()[-2:])


def _joined_dali(parts_dir: Path, into: Path) -> dict:
    """DALI's wheels from parts_dir/dali.tar.part* when SHA256SUMS lists them all and they match."""
    import hashlib
    import tarfile

    sums_file = parts_dir / "SHA256SUMS"
    if not sums_file.exists():
        return {"status": f"not installed: no {sums_file}"}
    sums = dict(reversed(line.split()) for line in sums_file.read_text().splitlines() if line.strip())
    wanted = sorted(n for n in sums if ".part" in n)
    missing = [n for n in wanted if not (parts_dir / n).exists()]
    if missing:
        return {"status": f"not installed: {len(wanted) - len(missing)} of {len(wanted)} parts in {parts_dir} "
                          f"(missing {', '.join(missing)})"}
    joined = hashlib.sha256()
    into.mkdir(parents=True, exist_ok=True)
    tar_path = into / "dali.tar"
    with open(tar_path, "wb") as out:
        for name in wanted:
            data = (parts_dir / name).read_bytes()
            if hashlib.sha256(data).hexdigest() != sums[name]:
                return {"status": f"not installed: checksum of {name} does not match SHA256SUMS"}
            joined.update(data)
            out.write(data)
    if joined.hexdigest() != sums.get("dali.tar"):
        return {"status": "not installed: the joined dali.tar does not match SHA256SUMS"}
    with tarfile.open(tar_path) as tar:
        tar.extractall(into, filter="data")
    tar_path.unlink()
    return {"status": "installed", "wheels": sorted(into.glob("*.whl"))}


# ---------------------------------------------------------------- the table


def _fmt(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def targets(res: dict) -> list[tuple[str, str, str]]:
    """(target, measured, met: yes | no | not measured) for the issue's four targets."""
    def check(value: float | None, ok: bool, fmt: str) -> tuple[str, str]:
        return ("-", "not measured") if value is None else (fmt.format(value), "yes" if ok else "no")

    model = res.get("model", {})
    eager = next((v for v in model.get("variants", []) if v.get("images_per_sec")), None)
    bar = res.get("ceiling", {}).get("byol_bar")
    rows = {c["name"]: c for c in res.get("peers", {}).get("contenders", []) if c.get("status") == "ok"}
    peer_rates = [rows[p]["images_per_sec"] for p in ("lightly", "byol-pytorch") if p in rows]
    vs_peer = rows["fastbyol"]["images_per_sec"] / max(peer_rates) if peer_rates and "fastbyol" in rows else None
    vs_bar = eager["images_per_sec"] / bar if eager and bar else None
    share = (model.get("fused_ops") or {}).get("share_foreach")
    out = [("fastbyol / the faster peer >= 1.3 (peers stage, same run)",
            *check(vs_peer, (vs_peer or 0) >= 1.3, "{:.2f}x")),
           ("model-only eager / (3/8 ceiling) >= 0.9", *check(vs_bar, (vs_bar or 0) >= 0.9, "{:.2f}")),
           ("LARS + EMA (foreach) < 2 % of the eager step", *check(share, (share or 1) < 0.02, "{:.1%}"))]
    for stage, backend in (("loader", "ffcv"), ("dali", "dali")):
        b = (res.get(stage, {}).get("backends") or {}).get(backend, {})
        ratio = b.get("end_to_end_over_model")
        out.append((f"{backend}: end-to-end / model-only >= 0.97", *check(ratio, (ratio or 0) >= 0.97, "{:.3f}")))
    return out


def markdown(records: list[dict]) -> str:
    """The results of one run as Markdown: environment line, then one table row per figure."""
    by = {r["stage"]: r for r in records}
    res = {k: (r.get("result") or {}) for k, r in by.items()}
    env, ceiling = res.get("environment", {}), res.get("ceiling", {})
    bar = ceiling.get("byol_bar")
    runs = ", ".join(sorted({r["run"] for r in records}))
    lines = [f"fastbyol GPU suite, run {runs}: `python benchmarks/gpu_suite.py` (source images/sec)", "",
             f"{env.get('gpu', '-')} (driver {env.get('driver') or '-'}), torch {env.get('torch', '-')}, "
             f"CUDA {env.get('cuda') or '-'}, cuDNN {env.get('cudnn') or '-'}, {env.get('cpu_count', '-')} CPUs, "
             f"Python {env.get('python', '-')}", "",
             "| what | variant | batch | images/sec | vs 3/8 ceiling | peak GiB | note |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]

    def row(what: str, variant: str, batch: Any, rate: float | None, peak: Any = None, note: str = "") -> None:
        ratio = _fmt(rate / bar, 2) if rate and bar and what != "supervised ceiling" else "-"
        gib = _fmt(peak / 2**30, 1) if peak else "-"
        lines.append(f"| {what} | {variant} | {batch} | {_fmt(rate)} | {ratio} | {gib} | {note} |")

    for variant, rate in (ceiling.get("images_per_sec") or {}).items():
        row("supervised ceiling", variant, ceiling.get("batch"), rate,
            note=f"3/8 of the best = {_fmt(bar)} (the BYOL bar)" if variant == "eager" else "")
    model = res.get("model", {})
    for v in model.get("variants", []):
        note = v.get("error", "")
        if "stride_warnings" in v:
            note = f"grad-stride warnings: {len(v['stride_warnings'])}" + (f" ({v['stride_warnings'][0][:60]})"
                                                                           if v["stride_warnings"] else "")
        row("fastbyol model-only", v["name"], v["batch"], v.get("images_per_sec"), v.get("peak_memory_bytes"), note)
    fused = model.get("fused_ops") or {}
    if "share_foreach" in fused:
        shares = f"{100 * fused['share_foreach']:.1f} % / {100 * fused['share_per-param loop']:.1f} %"
        lines.append(f"| LARS + EMA share of the eager step | foreach / per-param loop "
                     f"| {model['variants'][0]['batch']} | - | - | - | {shares} |")
    if "host_syncs" in model:
        lines.append(f"| host syncs inside one step | | | | | | {model['host_syncs']} |")
    for c in res.get("peers", {}).get("contenders", []):
        row("peer step", c["name"], res["peers"]["settings"]["batch"], c.get("images_per_sec"),
            c.get("peak_memory_bytes"), "" if c["status"] == "ok" else f"{c['status']}: {c['reason'][:80]}")
    for stage in ("loader", "dali"):
        for backend, b in (res.get(stage, {}).get("backends") or {}).items():
            if "error" in b:
                lines.append(f"| loader hidden | {backend} | | | | | {b['error'][:120]} |")
                continue
            lines.append(f"| loader hidden | {backend} | {model.get('variants', [{}])[0].get('batch', '')} "
                         f"| {_fmt(b['end_to_end'])} | {_fmt(b['end_to_end'] / bar, 2) if bar else '-'} | - | "
                         f"loader {_fmt(b['loader'])}, model {_fmt(b['model'])}, e2e/model "
                         f"{b['end_to_end_over_model']:.3f}, {b['verdict']} |")
    lines += ["", "| target (issue 12) | measured | met |", "| --- | ---: | --- |"]
    lines += [f"| {what} | {value} | {met} |" for what, value, met in targets(res)]
    lines += ["", "| stage | status | seconds | budget s |", "| --- | --- | ---: | ---: |"]
    lines += [f"| {r['stage']} | {r['status']} | {r['seconds']:.0f} | {r['budget_s']:.0f} |" for r in records]
    return "\n".join(lines) + "\n"


def latest_records(results: Path) -> list[dict]:
    """The newest record of each stage in a results.jsonl (a later run of one stage, e.g. dali once
    its parts are in, replaces that stage's row), in stage order."""
    newest = {}
    for line in results.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            newest[r["stage"]] = r
    return [newest[s] for s in ("install", *STAGES) if s in newest]


# ---------------------------------------------------------------- the command


def _child(stage: str, sizes: Sizes, device: str, work: Path) -> int:
    """Run one stage in this process, saving its (partial) result to WORK/<stage>.json."""
    sys.path.insert(0, str(REPO / "benchmarks"))  # peers, fused_ops
    if device == "cpu":
        import torch

        torch.set_num_threads(1)  # a busy small CPU: one thread per process is the stable choice
    out = work / f"{stage}.json"

    def save(partial: dict) -> None:
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(partial, default=str))
        tmp.replace(out)

    save(STAGE_FUNCTIONS[stage](sizes, device, work, save))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # loader threads (DALI, FFCV, numba) may keep a normal interpreter exit waiting


def _run_stage(stage: str, args: argparse.Namespace, budget: float, env: dict,
               log: Any) -> tuple[str, dict | None, str]:
    """(status, result, error) of one stage run in a child process killed after `budget` seconds."""
    out = args.work / f"{stage}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_stage", stage, "--device", args.device,
           "--work", str(args.work)] + (["--tiny"] if args.tiny else [])
    log.write(f"\n===== {stage} (budget {budget:.0f} s)\n")
    log.flush()
    try:
        proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.PIPE, text=True, timeout=budget)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        error = "" if proc.returncode == 0 else proc.stderr.strip()[-1500:]
        log.write(proc.stderr)
    except subprocess.TimeoutExpired as e:
        status, error = "timeout", f"stopped after its budget of {budget:.0f} s"
        log.write(e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or ""))
    result = json.loads(out.read_text()) if out.exists() else None
    if result is not None and status != "ok":
        status += ", partial result kept"
    return status, result, error


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                epilog="The GPU session's exact commands: benchmarks/README.md.")
    p.add_argument("--out", type=Path, default=Path("results/suite"), help="results.jsonl, results.md, suite.log")
    p.add_argument("--work", type=Path, default=Path("/tmp/fastbyol-suite"),
                   help="scratch: installed wheels, images, .beton (reused by a later run on the same node)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="tiny sizes, no compilation: every stage in under a minute")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--total", type=float, default=TOTAL_S, help=f"seconds for the whole suite (default {TOTAL_S})")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every stage budget")
    p.add_argument("--wheelhouse", type=Path, default=REPO / ".wheelhouse" / "core")
    p.add_argument("--dali-parts", type=Path, default=Path("/tmp/fastbyol-dali"),
                   help="folder holding dali.tar.part* and SHA256SUMS (brought over several commands)")
    p.add_argument("--_stage", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        p.error(f"--stages: unknown {', '.join(unknown)}; expected some of {', '.join(STAGES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = TINY if args.tiny else Sizes()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    if args._stage:
        return _child(args._stage, sizes, args.device, args.work)
    start = time.monotonic()
    deadline = start + args.total
    run_id = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    args.out.mkdir(parents=True, exist_ok=True)
    results, records = args.out / "results.jsonl", []

    def record(stage: str, status: str, seconds: float, budget: float, result: Any, error: str) -> None:
        records.append(dict(zip(RECORD_KEYS, (run_id, stage, status, seconds, budget, result, error))))
        with results.open("a") as f:
            f.write(json.dumps(records[-1], default=str) + "\n")
        (args.out / "results.md").write_text(markdown(latest_records(results)))  # a killed suite keeps it
        print(f"gpu_suite: {stage}: {status} in {seconds:.0f} s", flush=True)

    site = args.work / "site"
    t = time.monotonic()
    try:
        installed = install(args.wheelhouse, args.dali_parts, site)
        refused = installed.get("failed", {})
        record("install", f"{len(refused)} wheel(s) refused" if refused else "ok", time.monotonic() - t, INSTALL_S,
               installed, "; ".join(f"{k}: {v}" for k, v in refused.items()))
    except (RuntimeError, OSError) as e:
        record("install", "failed", time.monotonic() - t, INSTALL_S, None, str(e))
    # the tree first (fastbyol, pipelines), then the installed wheels
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), str(site),
                                                                     os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    with (args.out / "suite.log").open("a") as log:
        for stage in args.stages:
            left = deadline - time.monotonic()
            if left < 5:
                record(stage, "skipped: the suite's time is spent", 0.0, 0.0, None, "")
                continue
            budget = min(BUDGET_S[stage] * args.budget_scale, left)
            t = time.monotonic()
            status, result, error = _run_stage(stage, args, budget, env, log)
            record(stage, status, time.monotonic() - t, budget, result, error)
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
