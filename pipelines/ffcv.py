"""The FFCV backend (`data.backend: ffcv`): one FFCV Loader over a .beton, two views per image.

The .beton comes from `fastbyol convert` (fields `image`: RGBImageField, `label`: IntField).
Our decoder operation (pipelines.ffcv_decode.TwoCropDecoder) decodes each image once in FFCV's
compiled, multi-threaded code and writes two random resized crops; the uint8 batch
(B, 2, S, S, 3) goes to the device in one copy and `gpu_augment.make_view` makes each view, for
batch k+1 on a side stream while step k runs (pipelines.prefetch).

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

import io
import itertools
import os
import queue
from typing import Iterator

import numpy as np
import torch

from pipelines.gpu_augment import make_views
from pipelines.images import decode_rgb
from pipelines.loader import Batch, DataConfig, LoaderPlan, check_start_step
from pipelines.policy import AugmentConfig
from pipelines.prefetch import prefetch
from pipelines.seeding import derive_seed
from pipelines.sharding import pad_last_batch

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


FIX_BETON = "write it with `fastbyol convert SRC OUT.beton`"


def check_beton_path(path: str) -> None:
    """Raise a one-line error unless `path` is a file: the user's mistake is named before FFCV is
    needed, whether or not it is installed."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"data.path = {path}: no such file ({FIX_BETON})")
    if not os.path.isfile(path):
        raise ValueError(f"data.path = {path} is a directory; the ffcv backend reads one .beton file ({FIX_BETON})")


def check_beton(path: str) -> None:
    """Raise a one-line ValueError / FileNotFoundError unless `path` is a whole FFCV .beton: a
    file, with FFCV's format version, and header, field table, metadata and every sample's bytes
    inside the file (a copy cut short fails here, not deep inside FFCV)."""
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, FieldDescType, HeaderType

    check_beton_path(path)
    fix = FIX_BETON
    size = os.path.getsize(path)
    if size < HeaderType.itemsize:
        raise ValueError(f"{path} is not an FFCV .beton: {size} bytes, shorter than its header ({fix})")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if header["version"] != CURRENT_VERSION:
        raise ValueError(f"{path} is not an FFCV {CURRENT_VERSION} .beton (its header says format version "
                         f"{header['version']}); {fix}")
    table = int(header["alloc_table_ptr"])
    fields_end = HeaderType.itemsize + int(header["num_fields"]) * FieldDescType.itemsize
    damaged = f"{path} is truncated or damaged ({{}}, file size {size} bytes); {fix} again"
    if header["num_fields"] < 1 or not fields_end <= table <= size or (size - table) % ALLOC_TABLE_TYPE.itemsize:
        raise ValueError(damaged.format(f"allocation table at byte {table}"))
    alloc = np.fromfile(path, dtype=ALLOC_TABLE_TYPE, offset=table)
    if len(alloc) and int((alloc["ptr"] + alloc["size"]).max()) > table:
        raise ValueError(damaged.format(f"a sample ends at byte {int((alloc['ptr'] + alloc['size']).max())}"))


class CopyFence:
    """Host-side proof that the last non_blocking host→device copy out of FFCV's buffers ran.

    FFCV's CPU threads refill a batch's pinned slot as soon as the batch after it is taken from
    its queue: its reuse guard (EpochIterator.run) is a CUDA event waited on its own slot
    stream, which orders GPU work, not its CPU decoding. And at the epoch's end its buffers
    return to torch's pinned cache with no event recorded (they reach us through numpy, so the
    copy cannot record one on them). A copy queued behind the step may not have run by then,
    and a batch would carry a later batch's pixels. So: record() after each copy, wait() before
    the next batch is taken and before the buffers are let go. On a CPU the copy is synchronous.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.event: torch.cuda.Event | None = None

    def record(self) -> None:
        """Mark the copies just queued on the current stream."""
        if self.cuda:
            self.event = torch.cuda.Event()
            self.event.record()

    def wait(self) -> None:
        """Block the host until the copies marked by the last record() have run."""
        if self.event is not None:
            self.event.synchronize()
            self.event = None


class FFCVLoader:
    """The ffcv backend's TwoViewLoader for one rank (see pipelines.TwoViewLoader)."""

    def __init__(self, data: DataConfig, augment: AugmentConfig, device: torch.device | str,
                 rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        check_beton_path(str(data.path))
        require_ffcv()
        import numba
        from ffcv.fields.basics import IntDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.reader import Reader
        from ffcv.transforms import ToTensor
        from ffcv.traversal_order import QuasiRandom

        from pipelines.ffcv_decode import TwoCropDecoder

        augment.validate()
        self.path, self.augment = str(data.path), augment
        self.device, self.side_stream = torch.device(device), data.side_stream

        check_beton(self.path)  # FFCV's own reader answers a bad file with an assert or a numpy error
        reader = Reader(self.path)
        fields = reader.handlers
        if "image" not in fields or "label" not in fields:
            raise ValueError(
                f"{self.path}: fields {sorted(fields)}; expected 'image' and 'label' "
                "(write the file with `fastbyol convert`)"
            )
        self._reader, self._image_field = reader, f"f{list(fields).index('image')}"  # sources()
        quasi = data.ffcv.order == "quasi_random"
        self.plan = LoaderPlan.of(data, int(reader.num_samples), rank, world_size, seed, rank_blocks=quasi)
        self.batch_size = self.plan.batch_size
        v1, v2 = augment.view1, augment.view2
        self.decoder = TwoCropDecoder(v1.crop_size, (v1.crop_scale, v2.crop_scale),
                                      (v1.crop_ratio, v2.crop_ratio), augment.crop_sampler,
                                      data.ffcv.interpolation)
        pipelines: dict = {name: None for name in fields}  # other fields are not read
        pipelines["image"] = [self.decoder, ToTensor()]
        pipelines["label"] = [IntDecoder(), ToTensor()]
        # FFCV's workers are numba threads; numba refuses more than NUMBA_NUM_THREADS.
        threads = max(1, min(data.num_workers, numba.config.NUMBA_NUM_THREADS))
        initial = self.plan.block() if quasi else np.arange(self.plan.num_images, dtype=np.uint64)
        # FFCV sees exactly the indices we hand it each epoch: SEQUENTIAL order over `indices`,
        # no drop_last or distributed logic of its own.
        self._loader = Loader(
            self.path, batch_size=self.batch_size, num_workers=threads, os_cache=data.ffcv.os_cache,
            order=OrderOption.SEQUENTIAL, distributed=False, seed=0, indices=initial,
            pipelines=pipelines, drop_last=False, batches_ahead=data.prefetch,
        )
        # QuasiRandom maps this rank's block (the loader's indices) to the file's pages.
        self._quasi = QuasiRandom(self._loader) if quasi else None

    def __len__(self) -> int:
        return self.plan.steps

    def batch_indices(self, epoch: int, start_step: int = 0) -> list[np.ndarray]:
        """This rank's sample indices for steps start_step.. of `epoch`."""
        if self._quasi is None:
            return self.plan.batch_indices(epoch, start_step)
        check_start_step(start_step, self.plan.steps)
        from ffcv.traversal_order.quasi_random import generate_order_inner

        q = self._quasi
        order = np.zeros(int(q.page_sizes.sum()), dtype=np.int64)
        # FFCV's sample_order shuffles its page table in place, so that its order depends on
        # the calls before; on a copy, the order is a function of (seed, rank, epoch).
        generate_order_inner(derive_seed(self.plan.seed, self.plan.rank, epoch) & 0x7FFFFFFF,
                             q.page_to_samples_array.copy(), q.page_sizes, order,
                             2 * self.batch_size)
        b = self.batch_size
        return [pad_last_batch(order[i * b:(i + 1) * b], order, b) for i in range(start_step, self.plan.steps)]

    def sources(self, epoch: int, step: int, count: int) -> list[np.ndarray]:
        """pipelines.loader.HasSources: the images of batch `step` of `epoch` as the file stores them
        (its raw pixels, or its JPEG bytes decoded by PIL), read from the file without FFCV's loader."""
        return [self._stored_image(int(i)) for i in self.batch_indices(epoch, step)[0][:count]]

    def _stored_image(self, index: int) -> np.ndarray:
        from ffcv.fields.rgb_image import IMAGE_MODES

        meta = self._reader.metadata[index][self._image_field]
        h, w, start = int(meta["height"]), int(meta["width"]), int(meta["data_ptr"])
        data = np.memmap(self.path, np.uint8, mode="r")
        if meta["mode"] == IMAGE_MODES["raw"]:
            return np.array(data[start:start + h * w * 3]).reshape(h, w, 3)
        table = self._reader.alloc_table
        size = int(table["size"][table["ptr"] == start][0])
        return np.asarray(decode_rgb(io.BytesIO(data[start:start + size].tobytes())))

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """Yield Batch(view1, view2, labels) for steps start_step..len(self)-1 of `epoch`.

        Views: (B, 3, S, S) float32, normalized, channels_last, on the device; labels (B,)
        int64. Batches before start_step are neither read nor decoded.
        """
        batches = self.batch_indices(epoch, start_step)  # checks start_step before iterating
        return self._iterate(epoch, start_step, batches)

    def raw_batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """FFCV's output for steps start_step.. of `epoch`, before the device and make_view.

        Yields (crops, labels): crops (B, 2, S, S, 3) uint8 RGB, [:, 0] for view 1 and [:, 1]
        for view 2; labels (B, 1) int64. Both alias FFCV's buffers, valid until the next batch.
        """
        return self._raw(epoch, self.batch_indices(epoch, start_step))

    def _raw(self, epoch: int, batches: list[np.ndarray],
             fence: CopyFence | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """FFCV's batches; with `fence`, each is taken only once the copy out of the one before
        has finished, and the epoch's buffers are let go only once the last copy has."""
        if not batches:
            return
        # Only the last batch may be short, so FFCV's own chunking gives back these batches.
        self._loader.traversal_order.indices = np.concatenate(batches).astype(np.uint64)
        self.decoder.set_epoch_key(derive_seed(self.plan.seed, epoch))
        epoch_iter = iter(self._loader)
        try:
            while True:
                if fence is not None:
                    fence.wait()  # taking a batch frees the previous one's slot for refilling
                item = self._next(epoch_iter)
                if item is None:
                    break
                yield item
        finally:
            if fence is not None:
                fence.wait()  # the buffers go back to torch's pinned cache with no event of ours
            # Stop FFCV's thread when the consumer leaves early, and wait for it: two threads
            # in numba parallel code at once can abort the process (workqueue threading layer).
            epoch_iter.close()
            while epoch_iter.is_alive():
                # its end-of-epoch put(None) has no timeout: it waits forever while its queue is
                # full (a consumer that left after the second-to-last batches), so drain it
                try:
                    epoch_iter.output_queue.get_nowait()
                except queue.Empty:
                    pass
                epoch_iter.join(timeout=0.05)

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

    def _iterate(self, epoch: int, start_step: int, batches: list[np.ndarray]) -> Iterator[Batch]:
        fence = CopyFence(self.device)
        steps = itertools.count(start_step)  # prepare runs once per batch, in order

        def prepare(raw: tuple[torch.Tensor, torch.Tensor]) -> Batch:
            crops, labels = raw
            # One copy of both views' uint8 crops out of FFCV's pinned buffers
            crops = crops.to(self.device, non_blocking=True)  # (B, 2, S, S, 3)
            # copy: on the CPU, .to() would alias FFCV's buffer, which it reuses
            labels = labels.reshape(-1).to(self.device, torch.int64, non_blocking=True, copy=True)
            fence.record()
            # (B, 3, S, S) per view, channels-last strides
            pair = (crops[:, 0].permute(0, 3, 1, 2), crops[:, 1].permute(0, 3, 1, 2))
            view1, view2 = make_views(pair, self.augment, self.plan.seed, epoch, next(steps), self.plan.rank)
            return Batch(view1, view2, labels)

        # batch k+1 copied and augmented on a side stream while step k runs (pipelines.prefetch)
        return prefetch(self._raw(epoch, batches, fence), prepare, self.device, self.side_stream)
