"""Writing (image, label) samples to an FFCV .beton, with FFCV 1.0.2's writer loop replaced.

The file holds two fields, `image` (ffcv RGBImageField) and `label` (ffcv IntField), one sample
per image in the given order. Worker processes decode (pipelines.images.load_rgb) and encode.

Why the override: FFCV 1.0.2's `DatasetWriter._write_common` (ffcv/writer.py) starts the worker
processes, then polls their shared done-counter (`while previous != self.num_samples: ...
sleep(0.1)`) with its own tqdm bar, and only then reads their allocation lists. A worker that
raises (an image that cannot be decoded, a full disk) never adds its chunk to the counter, so
the parent waits forever; its shared-memory metadata block is never unlinked; and the progress
goes to its own bar. `_write_common` is private, so `FailFastWriter` overrides it alone, keeping
its arguments and its calls of `prepare` / `finalize` as 1.0.2 makes them, and the version is
pinned (pyproject.toml, tools/install_ffcv.sh): a new FFCV must be checked against this.

This module imports ffcv at load: import it only after checking that ffcv is installed.
"""

from __future__ import annotations

import ctypes
import math
import multiprocessing as mp
import queue
from typing import Callable, Sequence

import numpy as np
from ffcv.fields import IntField, RGBImageField
from ffcv.memory_allocator import MemoryAllocator
from ffcv.writer import DatasetWriter

from pipelines.images import load_rgb

MIN_PAGE = 1 << 23  # FFCV's default page size (8 MiB); one sample must fit in a page
CHUNK = 32  # samples per work item of a writer process


class ImageLabelDataset:
    """(image, label) pairs for FFCV's writer: image (H, W, 3) uint8 RGB, label int.

    A decode failure is also put on `errors` (when given) so that the parent process can name
    the file: the exception itself dies with the writer's worker process.
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int], max_side: int | None = None,
                 errors: "mp.Queue | None" = None) -> None:
        self.paths, self.labels = list(paths), list(labels)
        self.max_side, self.errors = max_side, errors

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        try:
            return load_rgb(self.paths[index], self.max_side), int(self.labels[index])
        except BaseException as err:
            if self.errors is not None:
                self.errors.put(str(err))
            raise


class FailFastWriter(DatasetWriter):
    """ffcv's DatasetWriter whose worker loop reports progress to `on_advance(n)` and raises
    RuntimeError (with the workers' reasons from `errors`) as soon as a worker dies."""

    def __init__(self, fname: str, fields: dict, page_size: int, num_workers: int,
                 on_advance: Callable[[int], None], errors: "mp.Queue") -> None:
        super().__init__(fname, fields, page_size=page_size, num_workers=num_workers)
        self.on_advance, self.errors = on_advance, errors

    def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
        self.num_samples = num_samples
        self.prepare()
        work: mp.Queue = mp.Queue()
        for todo in queue_content:
            work.put(todo)
        for _ in range(self.num_workers):
            work.put(None)  # one stop token per worker
        allocations_queue: mp.Queue = mp.Queue()
        done = mp.Value(ctypes.c_uint64, 0)
        allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
        args = (work, self.metadata_sm, self.metadata_type, self.fields, allocator, done,
                allocations_queue, *extra_worker_args)
        workers = [mp.Process(target=work_fn, args=args, daemon=True) for _ in range(self.num_workers)]
        try:
            for w in workers:
                w.start()
            allocations: list = []
            reported = finished = 0
            while finished < len(workers):
                try:  # drain as we go: a worker cannot exit before its queue is read
                    allocations.extend(allocations_queue.get(timeout=0.1))
                    finished += 1
                except queue.Empty:
                    pass
                value = done.value
                if value > reported:
                    self.on_advance(value - reported)
                    reported = value
                if any(w.exitcode not in (None, 0) for w in workers):
                    raise RuntimeError(f"a writer process failed: {self._reasons(workers)}")
            for w in workers:
                w.join()
            self.finalize(allocations)
        finally:
            for w in workers:
                if w.is_alive():
                    w.terminate()
                    w.join()
            self.metadata_sm.close()
            self.metadata_sm.unlink()

    def _reasons(self, workers: list[mp.Process]) -> str:
        """What the dead workers put on `errors`, or the first one's exit code."""
        reasons = []
        while True:
            try:
                reasons.append(self.errors.get(timeout=0.2))
            except queue.Empty:
                break
        dead = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
        return "; ".join(reasons) or f"exit code {dead[0]} (see the error above)"


def page_size(max_resolution: int | None) -> int:
    """Bytes per page: FFCV refuses a sample larger than a page, so a raw image must fit in one."""
    largest = 3 * (max_resolution or 4096) ** 2  # no max: raw images up to 4096 x 4096
    return max(MIN_PAGE, 1 << math.ceil(math.log2(largest + 1)))


def write_beton(path: str, paths: Sequence[str], labels: Sequence[int], *, max_resolution: int | None,
                jpeg_quality: int, write_mode: str, compress_probability: float, num_workers: int,
                on_advance: Callable[[int], None]) -> None:
    """Decode `paths` and write them with `labels` to the .beton `path` (written in place: the caller
    renames it once complete). The image options are RGBImageField's; `on_advance(n)` is called as
    samples are written; RuntimeError when a writer process dies, naming its reason."""
    fields = {
        "image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                               jpeg_quality=jpeg_quality, compress_probability=compress_probability),
        "label": IntField(),
    }
    errors: mp.Queue = mp.Queue()
    writer = FailFastWriter(path, fields, page_size(max_resolution), min(num_workers, len(paths)),
                            on_advance, errors)
    writer.from_indexed_dataset(ImageLabelDataset(paths, labels, max_resolution, errors), chunksize=CHUNK)


__all__ = ["FailFastWriter", "ImageLabelDataset", "MIN_PAGE", "page_size", "write_beton"]
