"""The DALI backend (`data.backend: dali`): read, decode and make both views inside DALI.

One DALI pipeline per rank and epoch: external source (files + per-sample draws) → JPEG decode ("mixed" = nvJPEG / the hardware
decoder on a GPU, "cpu" otherwise) → two crops resized → per view, all as DALI operators:
color jitter, grayscale, Gaussian blur, solarize, then flip + normalization fused in
crop_mirror_normalize. Every parameter comes from the view policies (pipelines/policy.py), with
the official BYOL semantics of DESIGN.md, so one config means the same augmentation here and in
pipelines/gpu_augment.py:

- brightness clip(x + δ); contrast clip(f·(x − mean_c) + mean_c) with mean_c the channel's
  spatial mean; saturation and hue in exact HSV (not DALI's fn.hsv, which works in YIQ space
  and is only an approximation): with v = max_c x, range = v − min_c x, saturation is
  x' = v − (v − x)·min(f, v / range) (HSV s·f clipped to 1, h and v kept) and hue rebuilds the
  channels from the hexcone x'_c = v − range·clip(min(k_c, 4 − k_c), 0, 1),
  k_c = (n_c + 6(h + δ)) mod 6, n = (5, 3, 1);
- the four jitter ops run in a random order per image: a per-image permutation index in
  [0, 24) picks, for each of the 4 slots, which op runs (DALI conditional execution, so each
  image computes exactly 4 ops);
- grayscale with the weights (0.2989, 0.5870, 0.1140); blur with a per-image σ, the 1D kernel
  exp(−t²/2σ²) of side policy.kernel_size() normalized to 1, run as two separable fn.filter
  passes with border="constant" (zero padding, as the official 'SAME' convolution; DALI's
  fn.gaussian_blur only mirrors the border); solarize x < t ? x : 1 − x;
- probabilities are per image (DALI `if` on a per-sample coin); p = 0 and p = 1 build no branch.

Deviations from the torch path (tests/test_dali.py checks the rest against it):
- The flip is applied last (in crop_mirror_normalize) instead of first. Every later op is
  pixel-wise, uses per-channel global means or a symmetric kernel with symmetric zero padding,
  so it commutes with a horizontal flip: the output distribution is identical.
- The crop boxes are pipelines/folder.py's (pipelines.crops.sample_crop, the same key); DALI
  slices (decode once) or ROI-decodes (decode roi) the box and resizes it cubic with
  antialiasing, which differs in detail from PIL's bicubic.
- No final clip: every op above already maps [0, 1] into [0, 1], so it would be a no-op.
- Cost: DALI fuses no arithmetic (one operator per +, *, ...), and its CPU arithmetic runs at
  ~1-2 ns per element, so the exact hue (~40 operators) is about half of the CPU augmentation
  time. On a GPU each operator is one small kernel. fn.hsv would be one operator, but in YIQ.
- DALI has no per-sample skip and stops at a file it cannot decode without naming it, so the
  file list is verified first (pipelines.image_list: the converter's decode check, cached by
  size and mtime): data.on_bad_image skip drops a bad file by path, error names it.

Order and sharding are done here (pipelines.loader.LoaderPlan, the rule of the folder and ffcv
backends): each epoch is a permutation numpy_rng(seed, epoch) of all images cut into global
batches, rank r taking the r-th slice of each. The pipeline reads through one external_source
(EpochSource) instead of fn.readers.file: per step it hands DALI the encoded files of this rank's
batch, their labels, and every per-sample random parameter of both views — crop box, flip,
jitter coin, factors and order, grayscale coin, blur coin and σ, solarize coin — drawn from
numpy_rng(seed, epoch, index, view) (`view_draws`). No DALI operator draws a random number. So a
view is a function of (seed, epoch, image, view) alone: a run resumed mid-epoch
(`epoch(e, start_step)` starts the batch list at that step, nothing is decoded to skip) sees
exactly the views of the uninterrupted run, and an image's views do not depend on the rank or
the world size. One pipeline is built per epoch (well under a second). The cost of drawing in
Python (one numpy Generator per image and view, and the file read) is measured in the README.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from pipelines.loader import Batch, DataConfig, LoaderPlan, check_start_step
from pipelines.crops import sample_crop
from pipelines.image_list import verify_images
from pipelines.policy import GRAY_WEIGHTS, AugmentConfig, ViewPolicy
from pipelines.seeding import derive_seed, numpy_rng

INSTALL_HINT = (
    "pip install nvidia-dali-cuda130 (CUDA 13 driver) or nvidia-dali-cuda120 (CUDA 12 driver); "
    "the CPU operators of either run without a GPU"
)
PERMS = list(itertools.permutations(range(4)))  # 24 orders of (brightness, contrast, sat, hue)
HUE_OFFSETS = (5.0, 3.0, 1.0)  # n_c of the hexcone formula for r, g, b
# Preallocation for nvJPEG (NVIDIA's ImageNet examples): avoids reallocations in the first epochs.
DEVICE_MEMORY_PADDING = 211025920
HOST_MEMORY_PADDING = 140544512


def import_dali() -> Any:
    """The nvidia.dali module, or ImportError saying which package to install."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError as err:
        raise ImportError(f"data.backend = dali needs NVIDIA DALI: {INSTALL_HINT}") from err
    return nvidia.dali


def resolve_device(option: str, device: torch.device | str) -> str:
    """'gpu' or 'cpu': where DALI decodes and augments for data.dali.device = `option`.

    auto is gpu when CUDA is available and the training device is CUDA, else cpu; gpu without
    CUDA is a RuntimeError.
    """
    device = torch.device(device)
    if option == "auto":
        return "gpu" if device.type == "cuda" and torch.cuda.is_available() else "cpu"
    if option == "gpu":
        if not torch.cuda.is_available():
            raise RuntimeError(
                "data.dali.device = gpu but CUDA is not available on this machine "
                "(torch.cuda.is_available() is False): set data.dali.device to cpu or auto"
            )
        return "gpu"
    if option == "cpu":
        return "cpu"
    raise ValueError(f"data.dali.device = {option!r}: expected auto, gpu or cpu")


def read_file_list(path: str | os.PathLike) -> tuple[list[str], list[int]]:
    """(paths, labels) from a text file of `path label` lines; relative paths are relative to
    the list's folder. Blank lines and lines starting with # are ignored."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected a list of `path label` lines)")
    root = path.parent
    paths, labels = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)  # the label is the last field: paths may hold spaces
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
            raise ValueError(f"{path}:{number}: {line!r}: expected `path label` with label >= 0")
        paths.append(str(root / parts[0]))
        labels.append(int(parts[1]))
    if not paths:
        raise ValueError(f"{path}: no `path label` lines")
    return paths, labels


def list_images(path: str) -> tuple[list[str], list[int]]:
    """(paths, labels) of data.path: a `.txt` file list or an ImageFolder root."""
    if path.endswith(".txt"):
        return read_file_list(path)
    from pipelines.folder import find_images  # one definition of the layout and class indices

    paths, labels, _ = find_images(path)
    return paths, labels


# ---- the DALI graph (traced by DALI's autograph: `if` on a DataNode is per-sample) ----------

def _brightness(x: Any, delta: Any) -> Any:
    import nvidia.dali.math as dmath

    return dmath.clamp(x + delta, 0.0, 1.0)


def _contrast(x: Any, factor: Any) -> Any:
    import nvidia.dali.math as dmath
    from nvidia.dali import fn

    mean = fn.reductions.mean(x, axes=[0, 1])  # (3,): each channel's spatial mean
    return dmath.clamp(factor * (x - mean) + mean, 0.0, 1.0)


def _value_range(x: Any) -> tuple[Any, Any]:
    """HSV v = max_c x and range = v − min_c x, each (H, W, 1)."""
    from nvidia.dali import fn

    v = fn.reductions.max(x, axes=[2], keep_dims=True)
    return v, v - fn.reductions.min(x, axes=[2], keep_dims=True)


def _saturation(x: Any, factor: Any) -> Any:
    """HSV s·factor clipped to 1, h and v kept: x' = v − (v − x)·min(factor, v / range)."""
    import nvidia.dali.math as dmath

    v, rng = _value_range(x)
    # range = 0 (gray pixel) has v − x = 0: any finite gain leaves it unchanged
    gain = dmath.min(factor, v / dmath.max(rng, 1e-12))
    return v - (v - x) * gain


def _hue(x: Any, delta: Any) -> Any:
    """HSV h + delta (turns, mod 1), s and v kept, rebuilt with the hexcone formula."""
    import nvidia.dali.math as dmath
    from nvidia.dali import types

    v, rng = _value_range(x)
    r, g, b = x[:, :, 0:1], x[:, :, 1:2], x[:, :, 2:3]
    inv = 1.0 / dmath.max(rng, 1e-12)  # gray pixels: numerators are 0, so h = 0
    is_r, is_g = r == v, g == v
    # h in sixths of a turn; ties pick r, then g (equal values there anyway)
    h6 = is_r * ((g - b) * inv) + (1 - is_r) * (
        is_g * ((b - r) * inv + 2.0) + (1 - is_g) * ((r - g) * inv + 4.0)
    )
    h6 = h6 + 6.0 * delta
    k = h6 + types.Constant(np.array(HUE_OFFSETS, dtype=np.float32))  # (H, W, 3)
    k = k - 6.0 * dmath.floor(k / 6.0)
    return v - rng * dmath.clamp(dmath.min(k, 4.0 - k), 0.0, 1.0)


def _jitter(x: Any, p: ViewPolicy, r: dict[str, Any]) -> Any:
    """The four jitter ops in the per-image order r["perm"], each followed by a clip."""
    from nvidia.dali import fn, types

    for slot in range(4):
        op = fn.lookup_table(
            r["perm"], keys=list(range(len(PERMS))), values=[order[slot] for order in PERMS],
            dtype=types.INT32,
        )
        # strength 0 is the identity (x is already in [0, 1]): no op, no branch
        if op == 0:
            if p.brightness > 0:
                x = _brightness(x, r["brightness"])
        elif op == 1:
            if p.contrast > 0:
                x = _contrast(x, r["contrast"])
        elif op == 2:
            if p.saturation > 0:
                x = _saturation(x, r["saturation"])
        else:
            if p.hue > 0:
                x = _hue(x, r["hue"])
    return x


def _grayscale(x: Any) -> Any:
    from nvidia.dali import fn, types

    weights = types.Constant(np.array(GRAY_WEIGHTS, dtype=np.float32))
    y = fn.reductions.sum(x * weights, axes=[2], keep_dims=True)
    return fn.cat(y, y, y, axis=2)


def _blur(x: Any, sigma: Any, k: int) -> Any:
    """Separable Gaussian of per-image `sigma` (pixels, CPU), odd side k, zero padding."""
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, types

    t = types.Constant(np.arange(-(k // 2), k // 2 + 1, dtype=np.float32))
    w = dmath.exp(-(t * t) / (2.0 * sigma * sigma))
    w = w / fn.reductions.sum(w)
    x = fn.filter(x, fn.reshape(w, shape=[k, 1]), border="constant")
    return fn.filter(x, fn.reshape(w, shape=[1, k]), border="constant")


def _solarize(x: Any, threshold: float) -> Any:
    return x + (x >= threshold) * (1.0 - 2.0 * x)


def _augment(crop: Any, p: ViewPolicy, mean: Sequence[float], std: Sequence[float], r: dict[str, Any]) -> Any:
    """One view from a uint8 HWC crop: float HWC, normalized, flipped when r["flip"].

    `r` holds this view's per-sample draws (see `view_draws`) as DataNodes. Each step with
    p = 0 builds nothing, p = 1 runs on every image, else a per-image `if` on its coin.
    """
    from nvidia.dali import fn, types

    x = crop * (1.0 / 255.0)  # float32 in [0, 1]
    if 0 < p.jitter_p < 1:
        if r["jitter"]:
            x = _jitter(x, p, r)
    elif p.jitter_p >= 1:
        x = _jitter(x, p, r)
    if 0 < p.grayscale_p < 1:
        if r["gray"]:
            x = _grayscale(x)
    elif p.grayscale_p >= 1:
        x = _grayscale(x)
    k = p.kernel_size()
    if k > 1 and 0 < p.blur_p < 1:
        if r["blur"]:
            x = _blur(x, r["sigma"], k)
    elif k > 1 and p.blur_p >= 1:
        x = _blur(x, r["sigma"], k)
    if 0 < p.solarize_p < 1:
        if r["solarize"]:
            x = _solarize(x, p.solarize_threshold)
    elif p.solarize_p >= 1:
        x = _solarize(x, p.solarize_threshold)
    # The flip commutes with everything above (see the module docstring), so it is fused here.
    mirror = r["flip"] if p.flip_p > 0 else 0
    return fn.crop_mirror_normalize(
        x, mirror=mirror, mean=list(mean), std=list(std), dtype=types.FLOAT, output_layout="HWC"
    )


# ---- the per-sample random draws: pure functions of (seed, epoch, index, view) -----------------

# Per view: the crop box, then the coins and factors of _augment, in this order in the sample's
# stream. Scalars are 0-d arrays (DALI takes them as per-sample arguments and `if` predicates).
DRAWS = ("anchor", "shape", "flip", "jitter", "brightness", "contrast", "saturation", "hue", "perm", "gray",
         "blur", "sigma", "solarize")
ON_DEVICE = ("brightness", "contrast", "saturation", "hue")  # multiply the images: on their device


def used_draws(p: ViewPolicy) -> list[str]:
    """The draws `_augment` reads for policy `p` (a coin only when 0 < p < 1, a factor only when
    its op can run): DALI wants no unused external_source output."""
    used = {"anchor": True, "shape": True, "flip": p.flip_p > 0, "jitter": 0 < p.jitter_p < 1,
            "perm": p.jitter_p > 0, "gray": 0 < p.grayscale_p < 1,
            "blur": p.kernel_size() > 1 and 0 < p.blur_p < 1, "sigma": p.kernel_size() > 1 and p.blur_p > 0,
            "solarize": 0 < p.solarize_p < 1}
    for name in ON_DEVICE:
        used[name] = p.jitter_p > 0 and getattr(p, name) > 0
    return [name for name in DRAWS if used[name]]


def view_draws(seed: int, epoch: int, index: int, view: int, p: ViewPolicy, height: int, width: int,
               sampler: str = "official") -> dict[str, np.ndarray]:
    """View `view` (1 or 2) of image `index` in `epoch`: its crop box (anchor = (top, left), shape =
    (h, w), pixels; the box pipelines/folder.py draws for the same key) and every coin and
    factor of the view policy, from numpy_rng(seed, epoch, index, view)."""
    rng = numpy_rng(seed, epoch, index, view)
    top, left, h, w = sample_crop(rng, height, width, p.crop_scale, p.crop_ratio, sampler)
    u = rng.random(11)
    f32 = np.float32
    return {
        "anchor": np.array([top, left], f32), "shape": np.array([h, w], f32),
        "flip": np.array(u[0] < p.flip_p, np.int32), "jitter": np.array(u[1] < p.jitter_p),
        "brightness": np.array(p.brightness * (2 * u[2] - 1), f32),
        "contrast": np.array(1 + p.contrast * (2 * u[3] - 1), f32),
        "saturation": np.array(1 + p.saturation * (2 * u[4] - 1), f32),
        "hue": np.array(p.hue * (2 * u[5] - 1), f32),
        "perm": np.array(min(int(u[6] * len(PERMS)), len(PERMS) - 1), np.int32),
        "gray": np.array(u[7] < p.grayscale_p),
        "blur": np.array(u[8] < p.blur_p),
        "sigma": np.array(p.blur_sigma[0] + (p.blur_sigma[1] - p.blur_sigma[0]) * u[9], f32),
        "solarize": np.array(u[10] < p.solarize_p),
    }


class EpochSource:
    """external_source callback of one rank's epoch: for step `batch_info.iteration`, the encoded
    files, the labels and each view's used draws (`names`), as per-sample lists; StopIteration
    after the last step. Plain data and stateless, so DALI's worker processes can run it
    (parallel external source): the draws then cost the training process nothing."""

    def __init__(self, loader: "DALILoader", epoch: int, start_step: int) -> None:
        images, augment = loader.images, loader.augment
        self.paths, self.labels, self.heights, self.widths = images.paths, images.labels, images.heights, images.widths
        self.seed, self.epoch, self.sampler = loader.plan.seed, epoch, augment.crop_sampler
        self.policies = (augment.view1, augment.view2)
        self.batches = loader.plan.batch_indices(epoch, start_step)
        self.names = (used_draws(augment.view1), used_draws(augment.view2))

    @property
    def num_outputs(self) -> int:
        return 2 + len(self.names[0]) + len(self.names[1])

    def __call__(self, batch_info: Any) -> list[list[np.ndarray]]:
        step = batch_info.iteration
        if step >= len(self.batches):
            raise StopIteration
        indices = [int(i) for i in self.batches[step]]
        out = [[np.fromfile(self.paths[i], dtype=np.uint8) for i in indices],
               [np.array([self.labels[i]], np.int32) for i in indices]]
        for view, (policy, names) in enumerate(zip(self.policies, self.names), start=1):
            draws = [view_draws(self.seed, self.epoch, i, view, policy, self.heights[i], self.widths[i], self.sampler)
                     for i in indices]
            out += [[d[name] for d in draws] for name in names]
        return out


def _graph(
    source: EpochSource,
    policies: tuple[ViewPolicy, ViewPolicy],
    mean: Sequence[float],
    std: Sequence[float],
    decode: str,
    dev: str,
    hw_decoder_load: float,
    parallel: bool,
) -> tuple[Any, Any, Any]:
    """The pipeline body: (view1, view2, label) with views float32 (S, S, 3) per sample.
    parallel: EpochSource runs in DALI's worker processes instead of the training thread."""
    from nvidia.dali import fn, types

    nodes = fn.external_source(source=source, num_outputs=source.num_outputs, batch=True, batch_info=True,
                               parallel=parallel, **({"prefetch_queue_depth": 2} if parallel else {}))
    jpegs, label = nodes[0], nodes[1]
    n1 = len(source.names[0])
    per_view = [dict(zip(source.names[0], nodes[2:2 + n1])), dict(zip(source.names[1], nodes[2 + n1:]))]
    if dev == "gpu":
        per_view = [{k: v.gpu() if k in ON_DEVICE else v for k, v in r.items()} for r in per_view]
    # adjust_orientation off: the boxes were drawn on the stored size, as PIL (folder, convert) sees it
    decoder: dict[str, Any] = dict(device="cpu", output_type=types.RGB, adjust_orientation=False)
    if dev == "gpu":
        decoder.update(
            device="mixed", hw_decoder_load=hw_decoder_load,
            device_memory_padding=DEVICE_MEMORY_PADDING, host_memory_padding=HOST_MEMORY_PADDING,
        )
    box = dict(axis_names="HW", normalized_anchor=False, normalized_shape=False)
    crops = []
    if decode == "once":
        images = fn.decoders.image(jpegs, **decoder)
        crops = [fn.slice(images, r["anchor"], r["shape"], **box) for r in per_view]
    else:  # roi: each view decodes only the region of its crop
        crops = [fn.decoders.image_slice(jpegs, r["anchor"], r["shape"], **box, **decoder) for r in per_view]
    # crop, then resize (as pipelines/folder.py): a resize with a ROI would read outside the box
    crops = [fn.resize(c, size=[p.crop_size, p.crop_size], interp_type=types.INTERP_CUBIC, antialias=True)
             for c, p in zip(crops, policies)]
    view1, view2 = (_augment(c, p, mean, std, r) for c, p, r in zip(crops, policies, per_view))
    return view1, view2, label.gpu() if dev == "gpu" else label


# ---- the loader -----------------------------------------------------------------------------

def _cuda_index(device: torch.device) -> int:
    """The CUDA device DALI runs on: the training device's, else the current one."""
    if device.type == "cuda" and device.index is not None:
        return device.index
    return torch.cuda.current_device()


class DALILoader:
    """The DALI backend's TwoViewLoader for one rank: data.path is an ImageFolder root or a
    `.txt` list of `path label` lines."""

    def __init__(self, data: DataConfig, augment: AugmentConfig, device: torch.device | str,
                 rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        import_dali()
        augment.validate()
        paths, labels = list_images(data.path)
        # DALI stops at a file it cannot decode, naming none: check the list first (cached)
        self.images = verify_images(paths, labels, data.on_bad_image, data.num_workers, name=str(data.path))
        self.paths, self.labels = self.images.paths, self.images.labels
        self.data, self.augment = data, augment
        self.device = torch.device(device)
        self.dali_device = resolve_device(data.dali.device, self.device)
        # EpochSource in DALI's worker processes on GPUs, where its ~0.1 ms per image would otherwise
        # come out of the training thread; on CPUs the operators are ~25x slower than the draws, and
        # spawning the workers costs seconds per epoch's pipeline
        self.parallel_source = self.dali_device == "gpu"
        self.plan = LoaderPlan.of(data, len(self.paths), rank, world_size, seed)
        self.batch_size = self.plan.batch_size

    def __len__(self) -> int:
        return self.plan.steps

    def pipeline(self, epoch: int, start_step: int = 0) -> Any:
        """The (unbuilt) DALI pipeline of this rank's steps start_step.. of `epoch`."""
        dali = import_dali()
        gpu = self.dali_device == "gpu"
        build = dali.pipeline_def(_graph, enable_conditionals=True)
        return build(
            source=EpochSource(self, epoch, start_step),
            policies=(self.augment.view1, self.augment.view2),
            mean=self.augment.mean, std=self.augment.std,
            decode=self.data.dali.decode, dev=self.dali_device,
            hw_decoder_load=self.data.dali.hw_decoder_load,
            batch_size=self.batch_size,
            num_threads=max(1, self.data.num_workers),
            device_id=_cuda_index(self.device) if gpu else None,
            prefetch_queue_depth=self.data.prefetch,
            parallel=self.parallel_source,
            **({"py_num_workers": max(1, self.data.num_workers // 2), "py_start_method": "spawn"}
               if self.parallel_source else {}),
            seed=derive_seed(self.plan.seed, epoch) % (2**31 - 1),  # no DALI operator draws: all comes from EpochSource
        )

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """Yield Batch(view1, view2, labels) for steps start_step..len(self)-1 of `epoch`.

        Views are float32 (B, 3, S, S), normalized, channels_last, on the device; labels int64
        (B,). B is the per-rank batch (smaller at a partial last step when drop_last is false).
        """
        check_start_step(start_step, self.plan.steps)
        return self._iterate(epoch, start_step)

    def _iterate(self, epoch: int, start_step: int) -> Iterator[Batch]:
        if start_step == self.plan.steps:
            return
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        iterator = DALIGenericIterator(
            [self.pipeline(epoch, start_step)], ["view1", "view2", "labels"],
            last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False,
        )
        try:
            for out in iterator:
                out = out[0]
                yield Batch(self._view(out["view1"]), self._view(out["view2"]),
                            out["labels"].reshape(-1).to(self.device, torch.int64, non_blocking=True))
        finally:
            del iterator  # frees the pipeline (and its device memory) before the next epoch's

    def _view(self, hwc: torch.Tensor) -> torch.Tensor:
        # (B, S, S, 3) contiguous is exactly (B, 3, S, S) in channels_last: a permute, no copy.
        # The DALI → torch hand-over is zero-copy too (DLPack, DALI's dynamic executor); only a
        # CPU pipeline feeding a CUDA device copies, once, to the device.
        return hwc.permute(0, 3, 1, 2).to(self.device, non_blocking=True)

