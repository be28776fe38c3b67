"""The FFCV backend (`data.backend: ffcv`): one FFCV Loader over a .beton, two views per image.

The .beton comes from `fastbyol convert` (fields `image`: RGBImageField, `label`: IntField).
Our decoder operation (pipelines.ffcv_decode.TwoCropDecoder) decodes each image once in FFCV's
compiled, multi-threaded code and writes two random resized crops; the uint8 batch
(B, 2, S, S, 3) goes to the device in one copy and `gpu_augment.make_view` makes each view.

Order and sharding are ours, so they are testable without torch.distributed and resumable:
- order random: epoch e is numpy_rng(seed, e).permutation(N) cut into global batches; rank r
  takes the r-th slice of each (the same images per step as the folder backend).
- order quasi_random (datasets larger than RAM, with os_cache false): each rank owns a fixed
  contiguous block of N // world_size samples and visits it in FFCV's page-aware QuasiRandom
  order (seeded by seed, rank, epoch), so each rank reads only its own pages.
FFCV is then asked for exactly those indices, in that order (its SEQUENTIAL order over
`indices`). start_step drops the first batches from the indices: skipped batches are not read.

Reproducibility: for the same .beton, batch size and world size, a step's images, crop boxes
(keyed by (seed, epoch, sample index, view)) and colour/flip/blur draws (generator(seed, epoch,
step, view, rank)) are pure functions of (seed, epoch, step), whatever the thread count or
prefetch, and a resumed epoch sees what an uninterrupted one would. Not covered: a .beton
written again (write_mode proportion picks JPEG vs raw at random per image, and JPEG re-encoding
changes pixels), a different world size, and float rounding in GPU kernels.
"""

from __future__ import annotations

import queue
from typing import Iterator

import numpy as np
import torch

from pipelines import Batch, DataConfig, per_rank_batch
from pipelines.gpu_augment import make_view
from pipelines.policy import AugmentConfig
from pipelines.sharding import rank_batches, steps_per_epoch
from pipelines.seeding import derive_seed, generator

INSTALL_HINT = (
    "the ffcv backend needs FFCV 1.0.2, built from source: install Debian's pkg-config "
    "libturbojpeg0-dev libopencv-dev, then pip install 'fastbyol[ffcv]' "
    "(tools/install_ffcv.sh does both)"
)


def require_ffcv() -> None:
    """Raise ImportError with the install instructions when ffcv cannot be imported."""
    try:
        import ffcv.loader  # noqa: F401
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from err


def random_batches(n: int, epoch: int, seed: int, global_batch: int, rank: int,
                   world_size: int, drop_last: bool) -> list[np.ndarray]:
    """This rank's sample indices for each step of `epoch` in random order (pipelines.sharding's rule)."""
    return rank_batches(n, global_batch, rank, world_size, seed, epoch, drop_last)


def quasi_random_shard(n: int, rank: int, world_size: int) -> np.ndarray:
    """The contiguous block of sample indices rank r owns in quasi_random order (N // world)."""
    size = n // world_size
    return np.arange(rank * size, (rank + 1) * size, dtype=np.uint64)


class FFCVLoader:
    """The ffcv backend's TwoViewLoader for one rank (see pipelines.TwoViewLoader)."""

    def __init__(self, path: str, augment: AugmentConfig, device: torch.device | str, *,
                 global_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 drop_last: bool = True, num_workers: int = 1, prefetch: int = 2,
                 order: str = "random", os_cache: bool = True) -> None:
        require_ffcv()
        import numba
        from ffcv.fields.basics import IntDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.reader import Reader
        from ffcv.transforms import ToTensor
        from ffcv.traversal_order import QuasiRandom

        from pipelines.ffcv_decode import TwoCropDecoder

        if not 0 <= rank < world_size:
            raise ValueError(f"rank = {rank}: expected 0 <= rank < world_size = {world_size}")
        if order not in ("random", "quasi_random"):
            raise ValueError(f"data.ffcv.order = {order!r}: expected random or quasi_random")
        augment.validate()
        self.path, self.augment = str(path), augment
        self.device = torch.device(device)
        self.batch_size = per_rank_batch(global_batch, world_size)
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.seed, self.drop_last, self.order = seed, drop_last, order

        reader = Reader(self.path)
        fields = reader.handlers
        if "image" not in fields or "label" not in fields:
            raise ValueError(
                f"{self.path}: fields {sorted(fields)}; expected 'image' and 'label' "
                "(write the file with `fastbyol convert`)"
            )
        self.num_samples = int(reader.num_samples)
        v1, v2 = augment.view1, augment.view2
        self.decoder = TwoCropDecoder(v1.crop_size, (v1.crop_scale, v2.crop_scale),
                                      (v1.crop_ratio, v2.crop_ratio), augment.crop_sampler)
        pipelines: dict = {name: None for name in fields}  # other fields are not read
        pipelines["image"] = [self.decoder, ToTensor()]
        pipelines["label"] = [IntDecoder(), ToTensor()]
        # FFCV's workers are numba threads; numba refuses more than NUMBA_NUM_THREADS.
        threads = max(1, min(num_workers, numba.config.NUMBA_NUM_THREADS))
        n = self.num_samples
        if order == "random":
            initial = np.arange(n, dtype=np.uint64)
            per_rank = steps_per_epoch(n, global_batch, drop_last)
        else:
            initial = quasi_random_shard(n, rank, world_size)
            per_rank = steps_per_epoch(len(initial), self.batch_size, drop_last)
        self.steps = per_rank
        if self.steps == 0:
            raise ValueError(
                f"data.batch_size = {global_batch} leaves no step for {n} images on {world_size} "
                "rank(s) with drop_last true: lower the batch size or set data.drop_last false"
            )
        # FFCV sees exactly the indices we hand it each epoch: SEQUENTIAL order over `indices`,
        # no drop_last or distributed logic of its own.
        self._loader = Loader(
            self.path, batch_size=self.batch_size, num_workers=threads, os_cache=os_cache,
            order=OrderOption.SEQUENTIAL, distributed=False, seed=0, indices=initial,
            pipelines=pipelines, drop_last=False, batches_ahead=prefetch,
        )
        # QuasiRandom maps this rank's block (the loader's indices) to the file's pages.
        self._quasi = QuasiRandom(self._loader) if order == "quasi_random" else None

    def __len__(self) -> int:
        return self.steps

    def batch_indices(self, epoch: int) -> list[np.ndarray]:
        """This rank's sample indices for every step of `epoch` (len(self) arrays)."""
        if self._quasi is None:
            return random_batches(self.num_samples, epoch, self.seed, self.global_batch,
                                  self.rank, self.world_size, self.drop_last)
        from ffcv.traversal_order.quasi_random import generate_order_inner

        q = self._quasi
        order = np.zeros(int(q.page_sizes.sum()), dtype=np.int64)
        # FFCV's sample_order shuffles its page table in place, so that its order depends on
        # the calls before; on a copy, the order is a function of (seed, rank, epoch).
        generate_order_inner(derive_seed(self.seed, self.rank, epoch) & 0x7FFFFFFF,
                             q.page_to_samples_array.copy(), q.page_sizes, order,
                             2 * self.batch_size)
        b = self.batch_size
        return [order[i * b:(i + 1) * b] for i in range(self.steps)]

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """Yield Batch(view1, view2, labels) for steps start_step..len(self)-1 of `epoch`.

        Views: (B, 3, S, S) float32, normalized, channels_last, on the device; labels (B,)
        int64. Batches before start_step are neither read nor decoded.
        """
        if not 0 <= start_step <= self.steps:
            raise ValueError(f"start_step = {start_step}: expected 0 <= start_step <= {self.steps}")
        return self._iterate(epoch, start_step)

    def raw_batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """FFCV's output for steps start_step.. of `epoch`, before the device and make_view.

        Yields (crops, labels): crops (B, 2, S, S, 3) uint8 RGB, [:, 0] for view 1 and [:, 1]
        for view 2; labels (B, 1) int64. Both alias FFCV's buffers, valid until the next batch.
        """
        batches = self.batch_indices(epoch)[start_step:]
        if not batches:
            return
        # Only the last batch may be short, so FFCV's own chunking gives back these batches.
        self._loader.traversal_order.indices = np.concatenate(batches).astype(np.uint64)
        self.decoder.set_epoch_key(derive_seed(self.seed, epoch))
        epoch_iter = iter(self._loader)
        try:
            while True:
                item = self._next(epoch_iter)
                if item is None:
                    break
                yield item
        finally:
            # Stop FFCV's thread when the consumer leaves early, and wait for it: two threads
            # in numba parallel code at once can abort the process (workqueue threading layer).
            epoch_iter.close()
            epoch_iter.join()

    @staticmethod
    def _next(epoch_iter):
        """EpochIterator.__next__ that notices a dead loading thread instead of waiting forever
        (FFCV's thread dies silently on an exception in the pipeline, e.g. a corrupt file)."""
        while True:
            try:
                item = epoch_iter.output_queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not epoch_iter.is_alive():
                    raise RuntimeError(
                        "FFCV's loading thread stopped without finishing the epoch "
                        "(its error is printed above)"
                    ) from None
        if item is None:
            return None
        slot, result = item
        if getattr(epoch_iter, "cuda_streams", [None])[slot] is not None:
            # as EpochIterator.__next__: wait for the batch's stream before using its tensors
            epoch_iter.current_stream.wait_stream(epoch_iter.cuda_streams[slot])
        return result

    def _iterate(self, epoch: int, start_step: int) -> Iterator[Batch]:
        policies = (self.augment.view1, self.augment.view2)
        mean, std = self.augment.mean, self.augment.std
        raw = self.raw_batches(epoch, start_step)
        for step, (crops, labels) in enumerate(raw, start=start_step):
            # One copy of both views' uint8 crops; FFCV's buffers are pinned on a CUDA machine,
            # and it waits on the current stream before reusing them.
            crops = crops.to(self.device, non_blocking=True)  # (B, 2, S, S, 3)
            views = []
            for k, policy in enumerate(policies, start=1):
                x = crops[:, k - 1].permute(0, 3, 1, 2)  # (B, 3, S, S), channels-last strides
                # rank is a key so that ranks do not share augmentation draws row by row
                g = generator(self.device, self.seed, epoch, step, k, self.rank)
                views.append(make_view(x, policy, g, mean, std, dtype=torch.float32))
            # copy: on the CPU, .to() would alias FFCV's buffer, which it reuses
            labels = labels.reshape(-1).to(self.device, torch.int64, non_blocking=True, copy=True)
            yield Batch(views[0], views[1], labels)


def build(
    data: DataConfig,
    augment: AugmentConfig,
    device: torch.device | str,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
) -> FFCVLoader:
    """The ffcv backend for `rank` of `world_size`: data.path is a .beton from `fastbyol convert`."""
    require_ffcv()
    return FFCVLoader(
        data.path, augment, device,
        global_batch=data.batch_size, rank=rank, world_size=world_size, seed=seed,
        drop_last=data.drop_last, num_workers=data.num_workers, prefetch=data.prefetch,
        order=data.ffcv.order, os_cache=data.ffcv.os_cache,
    )
