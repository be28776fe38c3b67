"""The DALI backend (`data.backend: dali`): read, decode and make both views inside DALI.

One pipeline per rank and run: external_source (files, labels and every per-image random
parameter) → decode ("mixed" = nvJPEG / the hardware decoder on a GPU, "cpu" otherwise) → two
crops resized (cubic, antialiased) → each view's augmentation as DALI operators
(pipelines/dali_augment.py, the policy of pipelines/gpu_augment.py, with its deviations).

Order and sharding are pipelines.loader.LoaderPlan's, as in the folder and ffcv backends. The
source (RunSource) computes, for DALI's `batch_info` (epoch_idx, iteration), the run's epoch and
step, that step's images and their draws from numpy_rng(seed, epoch, image, view): no operator
draws, so a view is a function of (seed, epoch, image, view) alone, whatever the rank, and a
resumed run sees the uninterrupted run's views. On GPUs the source runs in DALI's worker
processes (parallel external_source, spawned once per run). A new pipeline is built only when
`epoch(e, s)` is not the next epoch of the last one consumed to its end (a resume, an early exit).
DALI stops at a file it cannot decode, naming none, so the file list is verified first
(pipelines.image_list).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from pipelines import dali_augment
from pipelines.image_list import verify_images
from pipelines.loader import Batch, DataConfig, LoaderPlan, check_start_step, decode_sources
from pipelines.policy import AugmentConfig, ViewPolicy
from pipelines.seeding import derive_seed
from pipelines.sources import find_images

INSTALL_HINT = (
    "pip install nvidia-dali-cuda130 (CUDA 13 driver) or nvidia-dali-cuda120 (CUDA 12 driver); "
    "the CPU operators of either run without a GPU"
)
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
    paths, labels, _ = find_images(path)  # one definition of the layout and class indices
    return paths, labels


class RunSource:
    """external_source callback of one rank's run: DALI epoch `batch_info.epoch_idx` is epoch
    first_epoch + epoch_idx, the first one starting at first_step. For each step: the encoded
    files, the labels (B, 1) and each view's used draws, one array per draw (leading dimension
    B); StopIteration after the epoch's last step. Plain data and pure (one epoch's batch list
    cached), so DALI's worker processes can run it: the draws then cost the training process nothing."""

    def __init__(self, loader: "DALILoader", first_epoch: int, first_step: int) -> None:
        images, augment = loader.images, loader.augment
        self.paths = images.paths
        self.labels = np.asarray(images.labels, np.int32)
        self.heights, self.widths = np.asarray(images.heights), np.asarray(images.widths)
        self.plan, self.first_epoch, self.first_step = loader.plan, first_epoch, first_step
        self.policies, self.sampler = (augment.view1, augment.view2), augment.crop_sampler
        self.names = (dali_augment.used_draws(augment.view1), dali_augment.used_draws(augment.view2))
        self._batches: tuple[int, list[np.ndarray]] | None = None  # (epoch, its batch list)

    @property
    def num_outputs(self) -> int:
        return 2 + len(self.names[0]) + len(self.names[1])

    def step_of(self, batch_info: Any) -> tuple[int, int]:
        """(epoch, step) of the run for DALI's (epoch_idx, iteration)."""
        first = batch_info.epoch_idx == 0
        return self.first_epoch + batch_info.epoch_idx, batch_info.iteration + (self.first_step if first else 0)

    def __call__(self, batch_info: Any) -> list:
        epoch, step = self.step_of(batch_info)
        if step >= self.plan.steps:
            raise StopIteration
        if self._batches is None or self._batches[0] != epoch:
            self._batches = (epoch, self.plan.batch_indices(epoch))
        indices = self._batches[1][step]
        out = [[np.fromfile(self.paths[i], dtype=np.uint8) for i in indices], self.labels[indices].reshape(-1, 1)]
        for view, (policy, names) in enumerate(zip(self.policies, self.names), start=1):
            draws = dali_augment.draw_views(self.plan.seed, epoch, indices, view, policy, self.heights,
                                            self.widths, self.sampler)
            out += [draws[name] for name in names]
        return out


def _graph(
    source: RunSource,
    policies: tuple[ViewPolicy, ViewPolicy],
    mean: Sequence[float],
    std: Sequence[float],
    decode: str,
    dev: str,
    hw_decoder_load: float,
    parallel: bool,
) -> tuple[Any, Any, Any]:
    """The pipeline body: (view1, view2, label) with views float32 (S, S, 3) per sample.
    parallel: RunSource runs in DALI's worker processes instead of the training thread."""
    from nvidia.dali import fn, types

    nodes = fn.external_source(source=source, num_outputs=source.num_outputs, batch=True, batch_info=True,
                               parallel=parallel, **({"prefetch_queue_depth": 2} if parallel else {}))
    jpegs, label = nodes[0], nodes[1]
    n1 = len(source.names[0])
    per_view = [dict(zip(source.names[0], nodes[2:2 + n1])), dict(zip(source.names[1], nodes[2 + n1:]))]
    if dev == "gpu":
        per_view = [{k: v.gpu() if k in dali_augment.ON_DEVICE else v for k, v in r.items()} for r in per_view]
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
    view1, view2 = (dali_augment.view(c, p, mean, std, r) for c, p, r in zip(crops, policies, per_view))
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
        augment.validate()
        paths, labels = list_images(data.path)  # a bad path is named before DALI is needed
        import_dali()
        # DALI stops at a file it cannot decode, naming none: check the list first (cached)
        self.images = verify_images(paths, labels, data.on_bad_image, data.num_workers, name=str(data.path))
        self.paths, self.labels = self.images.paths, self.images.labels
        self.data, self.augment = data, augment
        self.device = torch.device(device)
        self.dali_device = resolve_device(data.dali.device, self.device)
        # RunSource in DALI's worker processes on GPUs, where its ~0.4 ms per image would otherwise
        # come out of the training thread; on CPUs the operators are far slower than the draws
        self.parallel_source = self.dali_device == "gpu"
        self.plan = LoaderPlan.of(data, len(self.paths), rank, world_size, seed)
        self.batch_size = self.plan.batch_size
        self._iterator: Any = None  # DALIGenericIterator over the run's pipeline
        self._continues: tuple[int, int] | None = None  # the (epoch, start_step) it yields next

    def __len__(self) -> int:
        return self.plan.steps

    def sources(self, epoch: int, step: int, count: int) -> list[np.ndarray]:
        """pipelines.loader.HasSources: the decoded files of batch `step` of `epoch`."""
        return decode_sources(self.paths, self.plan.batch_indices(epoch, step)[0], count)

    def pipeline(self, first_epoch: int, first_step: int = 0) -> Any:
        """The (unbuilt) DALI pipeline of this rank's steps from first_step of first_epoch on,
        epoch after epoch (DALI's epoch_idx 0, 1, ... is epoch first_epoch, first_epoch + 1, ...)."""
        dali = import_dali()
        gpu = self.dali_device == "gpu"
        build = dali.pipeline_def(_graph, enable_conditionals=True)
        return build(
            source=RunSource(self, first_epoch, first_step),
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
            seed=derive_seed(self.plan.seed) % (2**31 - 1),  # unused: no DALI operator draws
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
        if self._iterator is not None and self._continues == (epoch, start_step):
            self._iterator.reset()  # DALI's next epoch_idx: RunSource maps it to `epoch`
        else:
            self.close()  # frees the old pipeline (and its device memory) before the new one's
            from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

            self._iterator = DALIGenericIterator(
                [self.pipeline(epoch, start_step)], ["view1", "view2", "labels"],
                last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False,
            )
        self._continues = None  # until this epoch is consumed to its end
        for out in self._iterator:
            out = out[0]
            yield Batch(self._view(out["view1"]), self._view(out["view2"]),
                        out["labels"].reshape(-1).to(self.device, torch.int64, non_blocking=True))
        self._continues = (epoch + 1, 0)

    def close(self) -> None:
        """Free the pipeline, its worker processes and its memory (a later epoch builds anew)."""
        self._iterator, self._continues = None, None

    def _view(self, hwc: torch.Tensor) -> torch.Tensor:
        # (B, S, S, 3) contiguous is exactly (B, 3, S, S) in channels_last: a permute, no copy.
        # The DALI → torch hand-over is zero-copy too (DLPack, DALI's dynamic executor); only a
        # CPU pipeline feeding a CUDA device copies, once, to the device.
        return hwc.permute(0, 3, 1, 2).to(self.device, non_blocking=True)
