"""The DALI backend (`data.backend: dali`): read, decode and make both views inside DALI.

One DALI pipeline per rank and epoch: file reader → JPEG decode ("mixed" = nvJPEG / the hardware
decoder on a GPU, "cpu" otherwise) → two random resized crops → per view, all as DALI operators:
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
- The crops come from DALI's random_resized_crop / ROI decoder (area ~ U[scale], aspect ratio
  log-uniform, 10 attempts), cubic with antialiasing; the fallback after 10 failed attempts and
  the resampling filter differ in detail from PIL's bicubic in pipelines/folder.py.
- No final clip: every op above already maps [0, 1] into [0, 1], so it would be a no-op.
- Cost: DALI fuses no arithmetic (one operator per +, *, ...), and its CPU arithmetic runs at
  ~1-2 ns per element, so the exact hue (~40 operators) is about half of the CPU augmentation
  time. On a GPU each operator is one small kernel. fn.hsv would be one operator, but in YIQ.
- A corrupt image stops the pipeline with DALI's error naming the file, whatever
  data.on_bad_image says (DALI has no per-sample skip).

Order and sharding are done here, not by DALI's reader: each epoch is the permutation
numpy_rng(seed, epoch) of all images cut into global batches, rank r taking the r-th slice of
each (the scheme of pipelines/folder.py, so both backends see the same images at every step).
The reader gets this rank's list for the epoch with random_shuffle off. That gives a true global
shuffle every epoch (DALI's random_shuffle only mixes a 1024-sample buffer inside a fixed
shard), the same number of steps on every rank, and a free resume: `epoch(e, start_step)` just
starts the list at step start_step, nothing is decoded to skip. The cost is one pipeline build
per epoch (well under a second). The augmentation draws come from DALI's RNG seeded with
derive_seed(seed, epoch, rank, start_step): a run resumed mid-epoch sees exactly the same
images in the same batches, but different (identically distributed) random crops and colors
than the uninterrupted run would have — DALI's operator RNG cannot jump ahead without
running every skipped batch.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from pipelines.loader import Batch, DataConfig, LoaderPlan, check_start_step
from pipelines.policy import GRAY_WEIGHTS, AugmentConfig, ViewPolicy
from pipelines.seeding import derive_seed

INSTALL_HINT = (
    "pip install nvidia-dali-cuda130 (CUDA 13 driver) or nvidia-dali-cuda120 (CUDA 12 driver); "
    "the CPU operators of either run without a GPU"
)
READER = "Reader"  # the file reader's name, for the iterator's epoch size
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

def _coin(p: float) -> Any:
    from nvidia.dali import fn, types

    return fn.random.coin_flip(probability=p, dtype=types.BOOL)


def _uniform(lo: float, hi: float, dev: str) -> Any:
    """One float per image ~ U[lo, hi], on the device of the images it will scale."""
    from nvidia.dali import fn

    u = fn.random.uniform(range=[lo, hi])
    return u.gpu() if dev == "gpu" else u


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


def _jitter(x: Any, p: ViewPolicy, dev: str) -> Any:
    """The four jitter ops in a random order per image, each followed by a clip."""
    from nvidia.dali import fn, types

    delta = _uniform(-p.brightness, p.brightness, dev)
    contrast = _uniform(1.0 - p.contrast, 1.0 + p.contrast, dev)
    saturation = _uniform(1.0 - p.saturation, 1.0 + p.saturation, dev)
    hue = _uniform(-p.hue, p.hue, dev)
    perm = fn.random.uniform(values=list(range(len(PERMS))), dtype=types.INT32)
    for slot in range(4):
        op = fn.lookup_table(
            perm, keys=list(range(len(PERMS))), values=[order[slot] for order in PERMS],
            dtype=types.INT32,
        )
        # strength 0 is the identity (x is already in [0, 1]): no op, no branch
        if op == 0:
            if p.brightness > 0:
                x = _brightness(x, delta)
        elif op == 1:
            if p.contrast > 0:
                x = _contrast(x, contrast)
        elif op == 2:
            if p.saturation > 0:
                x = _saturation(x, saturation)
        else:
            if p.hue > 0:
                x = _hue(x, hue)
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


def _augment(crop: Any, p: ViewPolicy, mean: Sequence[float], std: Sequence[float], dev: str) -> Any:
    """One view from a uint8 HWC crop: float HWC, normalized, flipped with p.flip_p."""
    from nvidia.dali import fn, types

    x = crop * (1.0 / 255.0)  # float32 in [0, 1]
    # Each step: p = 0 builds nothing, p = 1 runs on every image, else a per-image `if`.
    if 0 < p.jitter_p < 1:
        if _coin(p.jitter_p):
            x = _jitter(x, p, dev)
    elif p.jitter_p >= 1:
        x = _jitter(x, p, dev)
    if 0 < p.grayscale_p < 1:
        if _coin(p.grayscale_p):
            x = _grayscale(x)
    elif p.grayscale_p >= 1:
        x = _grayscale(x)
    k = p.kernel_size()
    if k > 1 and 0 < p.blur_p < 1:
        if _coin(p.blur_p):
            x = _blur(x, fn.random.uniform(range=list(p.blur_sigma)), k)
    elif k > 1 and p.blur_p >= 1:
        x = _blur(x, fn.random.uniform(range=list(p.blur_sigma)), k)
    if 0 < p.solarize_p < 1:
        if _coin(p.solarize_p):
            x = _solarize(x, p.solarize_threshold)
    elif p.solarize_p >= 1:
        x = _solarize(x, p.solarize_threshold)
    # The flip commutes with everything above (see the module docstring), so it is fused here.
    mirror = fn.cast(_coin(p.flip_p), dtype=types.INT32) if p.flip_p > 0 else 0
    return fn.crop_mirror_normalize(
        x, mirror=mirror, mean=list(mean), std=list(std), dtype=types.FLOAT, output_layout="HWC"
    )


def _graph(
    files: list[str],
    labels: list[int],
    policies: tuple[ViewPolicy, ViewPolicy],
    mean: Sequence[float],
    std: Sequence[float],
    decode: str,
    dev: str,
    hw_decoder_load: float,
) -> tuple[Any, Any, Any]:
    """The pipeline body: (view1, view2, label) with views float32 (S, S, 3) per sample."""
    from nvidia.dali import fn, types

    jpegs, label = fn.readers.file(
        files=files, labels=labels, random_shuffle=False, pad_last_batch=True, name=READER
    )
    decoder: dict[str, Any] = dict(device="cpu", output_type=types.RGB)
    if dev == "gpu":
        decoder.update(
            device="mixed", hw_decoder_load=hw_decoder_load,
            device_memory_padding=DEVICE_MEMORY_PADDING, host_memory_padding=HOST_MEMORY_PADDING,
        )
    crops = []
    if decode == "once":
        images = fn.decoders.image(jpegs, **decoder)
        for p in policies:
            crops.append(fn.random_resized_crop(
                images, size=[p.crop_size, p.crop_size], random_area=list(p.crop_scale),
                random_aspect_ratio=list(p.crop_ratio), num_attempts=10,
                interp_type=types.INTERP_CUBIC, antialias=True,
            ))
    else:  # roi: each view decodes only the region of its crop
        for p in policies:
            crop = fn.decoders.image_random_crop(
                jpegs, random_area=list(p.crop_scale), random_aspect_ratio=list(p.crop_ratio),
                num_attempts=10, **decoder,
            )
            crops.append(fn.resize(
                crop, size=[p.crop_size, p.crop_size], interp_type=types.INTERP_CUBIC,
                antialias=True,
            ))
    view1, view2 = (_augment(c, p, mean, std, dev) for c, p in zip(crops, policies))
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
        self.paths, self.labels = list_images(data.path)
        self.data, self.augment = data, augment
        self.device = torch.device(device)
        self.dali_device = resolve_device(data.dali.device, self.device)
        self.plan = LoaderPlan.of(data, len(self.paths), rank, world_size, seed)
        self.batch_size = self.plan.batch_size

    def __len__(self) -> int:
        return self.plan.steps

    def pipeline(self, epoch: int, start_step: int = 0) -> Any:
        """The (unbuilt) DALI pipeline of this rank's steps start_step.. of `epoch`."""
        dali = import_dali()
        order = np.concatenate(self.plan.batch_indices(epoch, start_step))
        gpu = self.dali_device == "gpu"
        build = dali.pipeline_def(_graph, enable_conditionals=True)
        return build(
            files=[self.paths[i] for i in order],
            labels=[self.labels[i] for i in order],
            policies=(self.augment.view1, self.augment.view2),
            mean=self.augment.mean, std=self.augment.std,
            decode=self.data.dali.decode, dev=self.dali_device,
            hw_decoder_load=self.data.dali.hw_decoder_load,
            batch_size=self.batch_size,
            num_threads=max(1, self.data.num_workers),
            device_id=_cuda_index(self.device) if gpu else None,
            prefetch_queue_depth=self.data.prefetch,
            seed=derive_seed(self.plan.seed, epoch, self.plan.rank, start_step) % (2**31 - 1),
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
            reader_name=READER, last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False,
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

