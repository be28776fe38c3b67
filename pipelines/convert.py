"""ImageNet / ImageFolder tree -> FFCV .beton (`fastbyol convert SRC OUT.beton`).

The .beton holds two fields, `image` (ffcv RGBImageField) and `label` (ffcv IntField), one
sample per source image in class order. Next to it, X.classes.json (for X.beton) maps each class name
(ImageNet synset) to its label, so that val can be written with train's mapping (`class_map=`).

Layouts read:
- ImageFolder / ImageNet train: SRC/<class>/**/<image>; an empty class folder still gets an index.
- ImageNet val, flat: SRC/<image> plus a label CSV such as LOC_val_solution.csv
  (`ImageId,PredictionString`; the first token of PredictionString is the synset).

Every image is decoded with PIL and converted to RGB, so CMYK and grayscale JPEGs and the PNG
saved as .JPEG that ImageNet contains come out as correct RGB. A first pass checks that every
file decodes (cheaply: JPEGs are decoded at 1/8 scale, which still reads every byte); unreadable
files are reported by path and skipped or fatal (`on_bad_image`). Writing is atomic: the file
is written as OUT.beton.tmp-<pid> and renamed at the end, so an interrupted conversion never
leaves an OUT.beton that looks complete.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import json
import math
import multiprocessing as mp
import os
import queue
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VAL_LABEL_FILES = ("LOC_val_solution.csv",)  # looked for in SRC and its parents (Kaggle layout)
WRITE_MODES = ("raw", "jpg", "proportion")
MIN_PAGE = 1 << 23  # FFCV's default page size (8 MiB); one sample must fit in a page


class BadImageError(OSError):
    """An image file that cannot be read or decoded; the message names the file. One class for the
    converter, the folder loader and DALI's verified file list, so one `except` catches them all."""


class BadImageWarning(UserWarning):
    """A bad image was skipped, by path (data.on_bad_image: skip)."""


@dataclass
class ConvertSummary:
    """What `convert` wrote."""

    out: str  # the .beton path
    class_map_path: str  # the JSON written next to it
    images: int  # samples in the .beton
    classes: int  # entries of the class map
    bytes: int  # size of the .beton file
    seconds: float  # wall time of the whole conversion
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of bad files
    empty_classes: list[str] = field(default_factory=list)  # classes with no image written

    @property
    def images_per_sec(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def report(self) -> str:
        """A few human-readable lines (printed by the CLI at the end)."""
        lines = [
            f"wrote {self.out}: {self.images:,} images, {self.classes:,} classes, "
            f"{self.bytes / 2**20:,.1f} MiB in {self.seconds:,.1f} s "
            f"({self.images_per_sec:,.0f} images/s)",
            f"class map: {self.class_map_path}",
        ]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} unreadable file(s):")
            lines += [f"  {path}: {reason}" for path, reason in self.skipped]
        if self.empty_classes:
            shown = ", ".join(self.empty_classes[:10])
            more = f" (+{len(self.empty_classes) - 10} more)" if len(self.empty_classes) > 10 else ""
            lines.append(f"{len(self.empty_classes)} class(es) with no image: {shown}{more}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Finding the images


def class_map_path(out: str | os.PathLike) -> Path:
    """X.beton -> X.classes.json (a name not ending in .beton: NAME -> NAME.classes.json)."""
    out = Path(out)
    stem = out.name[: -len(".beton")] if out.name.endswith(".beton") else out.name
    return out.with_name(stem + ".classes.json")


def load_class_map(path: str | os.PathLike) -> dict[str, int]:
    """Read a class map JSON ({class name: index}); indices must be 0..n-1, each once."""
    path = Path(path)
    try:
        mapping = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read the class map ({err})") from err
    if not isinstance(mapping, dict) or not all(
        isinstance(k, str) and isinstance(v, int) for k, v in mapping.items()
    ):
        raise ValueError(f"{path}: expected a JSON object {{class name: integer index}}")
    _check_class_map(mapping, str(path))
    return mapping


def _check_class_map(mapping: Mapping[str, int], where: str) -> None:
    if sorted(mapping.values()) != list(range(len(mapping))):
        raise ValueError(f"{where}: class indices must be 0..{len(mapping) - 1}, each used once")


def _image_files(folder: Path) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [
            os.path.join(root, f) for f in files
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
        ]
    return sorted(found)


def find_val_labels(src: Path) -> Path | None:
    """A LOC_val_solution.csv in SRC or up to four folders above it (the Kaggle ImageNet layout)."""
    for folder in [src, *list(src.resolve().parents)[:4]]:
        for name in VAL_LABEL_FILES:
            if (folder / name).is_file():
                return folder / name
    return None


def read_val_labels(path: str | os.PathLike) -> dict[str, str]:
    """{image stem: class name} from a CSV whose rows are `image id, "class more tokens..."`.

    LOC_val_solution.csv: `ILSVRC2012_val_00008726,n02119789 255 142 454 329 ...`; a header row
    (ImageId,PredictionString) is skipped. The image id may carry an extension.
    """
    path = Path(path)
    labels: dict[str, str] = {}
    with open(path, newline="") as f:
        for n, row in enumerate(csv.reader(f), start=1):
            if not row or (n == 1 and row[0].strip().lower() in ("imageid", "image", "filename")):
                continue
            if len(row) < 2 or not row[1].split():
                raise ValueError(
                    f"{path}:{n}: {','.join(row)!r}: expected `image id,class ...` "
                    "(LOC_val_solution.csv format)"
                )
            labels[Path(row[0].strip()).stem] = row[1].split()[0]
    if not labels:
        raise ValueError(f"{path}: no rows (expected `ImageId,PredictionString` lines)")
    return labels


def scan_source(
    src: str | os.PathLike,
    class_map: Mapping[str, int] | None = None,
    val_labels: str | os.PathLike | None = None,
    subset: int | None = None,
) -> tuple[list[str], list[int], dict[str, int]]:
    """The images under `src`, their labels and the class map used.

    src: an ImageFolder (SRC/<class>/**/<image>) or, with a label CSV (`val_labels`, or a
    LOC_val_solution.csv found next to it), a flat folder of images. class_map: {name: index} to
    use instead of the sorted class names (every class found must be in it). subset: keep the
    first N images (sorted by path) of each class. Returns (paths, labels, class_map).
    """
    src = Path(src).expanduser()
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: not a directory (expected an ImageFolder or ImageNet split)")
    if subset is not None and subset < 1:
        raise ValueError(f"subset = {subset}: expected a positive number of images per class")
    subdirs = sorted(e.name for e in os.scandir(src) if e.is_dir() and not e.name.startswith("."))
    flat = [str(src / f) for f in sorted(os.listdir(src))
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]

    if val_labels is None and not subdirs and flat:
        val_labels = find_val_labels(src)
        if val_labels is None:
            raise ValueError(
                f"{src}: images but no class folders; for a flat ImageNet val folder pass the "
                "label CSV (--val-labels LOC_val_solution.csv)"
            )
    if val_labels is not None:
        by_stem = read_val_labels(val_labels)
        paths = _image_files(src)
        if not paths:
            raise ValueError(f"{src}: no images (expected files ending in {', '.join(IMAGE_EXTENSIONS)})")
        missing = [p for p in paths if Path(p).stem not in by_stem]
        if missing:
            raise ValueError(
                f"{len(missing)} image(s) in {src} have no row in {val_labels}, e.g. {missing[0]}"
            )
        names = [by_stem[Path(p).stem] for p in paths]
    else:
        if set(subdirs) >= {"train", "val"}:
            raise ValueError(
                f"{src} holds train/ and val/: convert {src / 'train'} and {src / 'val'} separately "
                "(tools/convert_imagenet.py does both, val with train's class map)"
            )
        if not subdirs:
            raise ValueError(f"{src}: no class folders; expected the layout {src}/<class>/<image>")
        paths, names = [], []
        for name in subdirs:
            found = _image_files(src / name)
            paths += found
            names += [name] * len(found)
        if not paths:
            raise ValueError(f"{src}: no images in its {len(subdirs)} class folders")

    if class_map is None:
        # Empty class folders still get an index: the map must not depend on which files exist.
        found_classes = sorted(set(names) | set(subdirs if val_labels is None else ()))
        class_map = {name: i for i, name in enumerate(found_classes)}
    else:
        class_map = dict(class_map)
        _check_class_map(class_map, "class_map")
        unknown = sorted(set(names) - set(class_map))
        if unknown:
            raise ValueError(
                f"{len(unknown)} class(es) of {src} are not in the class map, e.g. {unknown[0]!r}: "
                "the class map must come from a conversion of the same classes (train)"
            )
    labels = [class_map[n] for n in names]
    if subset is not None:
        kept: dict[int, int] = {}
        keep = []
        # Stable: paths are sorted within each class, so "first N" is the same on every run.
        for i in sorted(range(len(paths)), key=lambda i: (labels[i], paths[i])):
            if kept.get(labels[i], 0) < subset:
                kept[labels[i]] = kept.get(labels[i], 0) + 1
                keep.append(i)
        paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
    return paths, labels, class_map


# ----------------------------------------------------------------------------------------------
# Decoding


def check_image(path: str) -> str | None:
    """None when the file decodes as an image, else the reason. JPEGs are decoded at 1/8 scale:
    the entropy-coded data is still read to the end (so truncation is caught) at ~1/10 the cost."""
    try:
        with Image.open(path) as image:
            if image.format == "JPEG":
                image.draft(None, (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
        return None
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError... for broken files
        return f"{type(err).__name__}: {err}"


def load_rgb(path: str, max_side: int | None = None) -> np.ndarray:
    """The image at `path` as an (H, W, 3) uint8 RGB array (CMYK, gray, palette, alpha converted).

    With max_side, a JPEG at least twice that size is decoded at a reduced DCT scale (1/2, 1/4,
    1/8) that keeps its long side >= max_side: the writer downsizes to max_side anyway, and
    this makes large JPEGs several times cheaper to read.
    """
    try:
        with Image.open(path) as image:
            if max_side and image.format == "JPEG" and max(image.size) >= 2 * max_side:
                s = max_side / max(image.size)
                image.draft(None, (math.ceil(image.width * s), math.ceil(image.height * s)))
            rgb = image.convert("RGB")  # convert() forces the full decode
    except Exception as err:
        raise BadImageError(f"{path}: cannot decode image ({type(err).__name__}: {err})") from err
    return np.asarray(rgb)


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


# ----------------------------------------------------------------------------------------------
# Writing


def _make_writer(fname: str, fields: dict, page_size: int, num_workers: int,
                 on_advance: Callable[[int], None], errors: "mp.Queue"):
    """An ffcv DatasetWriter whose worker loop reports progress to `on_advance` and fails fast.

    FFCV 1.0.2's own loop polls a counter until every sample is written: a worker that dies on
    an exception leaves it waiting forever. This one watches the workers' exit codes.
    """
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import DatasetWriter

    class Writer(DatasetWriter):
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
            workers = [mp.Process(target=work_fn, args=args, daemon=True)
                       for _ in range(self.num_workers)]
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
                        on_advance(value - reported)
                        reported = value
                    dead = [w.exitcode for w in workers if w.exitcode not in (None, 0)]
                    if dead:
                        reasons = []
                        while True:
                            try:
                                reasons.append(errors.get(timeout=0.2))
                            except queue.Empty:
                                break
                        why = "; ".join(reasons) or f"exit code {dead[0]} (see the error above)"
                        raise RuntimeError(f"a writer process failed: {why}")
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

    return Writer(fname, fields, page_size=page_size, num_workers=num_workers)


def _page_size(max_resolution: int | None) -> int:
    # A raw image must fit in one page: FFCV refuses samples larger than the page size.
    largest = 3 * (max_resolution or 4096) ** 2  # no max: raw images up to 4096 x 4096
    return max(MIN_PAGE, 1 << math.ceil(math.log2(largest + 1)))


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn,
                               TextColumn, TimeElapsedColumn, TimeRemainingColumn)
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:,.0f} images/s" if speed else "- images/s")

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(),
        TextColumn("ETA"), TimeRemainingColumn(), TimeElapsedColumn(),
        console=Console(stderr=True), disable=not enabled,
    )


def _verify(paths: Sequence[str], num_workers: int, on_bad_image: str, progress) -> list[tuple[str, str]]:
    task = progress.add_task("check  ", total=len(paths))
    bad = []
    chunk = max(1, min(64, len(paths) // (4 * num_workers) or 1))
    with mp.Pool(num_workers) as pool:
        for path, reason in zip(paths, pool.imap(check_image, paths, chunksize=chunk)):
            progress.advance(task)
            if reason is None:
                continue
            if on_bad_image == "error":
                raise BadImageError(f"{path}: cannot decode image ({reason})")
            progress.console.print(f"[yellow]skipping unreadable image[/] {path}: {reason}")
            bad.append((path, reason))
    return bad


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    max_resolution: int | None = 512,
    jpeg_quality: int = 90,
    write_mode: str = "proportion",
    compress_probability: float = 0.5,
    num_workers: int | None = None,
    subset: int | None = None,
    class_map: str | os.PathLike | Mapping[str, int] | None = None,
    on_bad_image: str = "skip",
    val_labels: str | os.PathLike | None = None,
    verify: bool = True,
    progress: bool = True,
) -> ConvertSummary:
    """Write the images under `src` to the FFCV file `out` (+ `out`'s .classes.json).

    max_resolution: long side in pixels the images are downsized to (never upsized); None keeps
      the original size. Smaller is a smaller file and a faster decode; the random crops of
      BYOL then come from fewer pixels (256 is FFCV's ImageNet low-res choice; 400-512 keeps
      more detail for 224 crops at ~3x the bytes).
    jpeg_quality: 1-100, for images stored as JPEG.
    write_mode: raw (uint8 pixels: no decode cost, ~5-10x larger), jpg (smallest, every image is
      decoded each epoch) or proportion (each image is JPEG with probability
      `compress_probability`, else raw: trades file size against decode CPU).
    num_workers: processes decoding and encoding (default: all cores).
    subset: keep the first N images of each class (quick trials).
    class_map: {name: index} or a path to a .classes.json (e.g. train's for val); default: the
      sorted class names.
    on_bad_image: skip (report the path and leave it out) or error (stop at the first one).
    val_labels: label CSV of a flat val folder (LOC_val_solution.csv is found automatically).
    verify: check that every file decodes before writing (cheap); without it a bad file is
      fatal mid-way.
    Returns the ConvertSummary; the .beton appears only when everything was written.
    """
    start = time.perf_counter()
    if write_mode not in WRITE_MODES:
        raise ValueError(f"write_mode = {write_mode!r}: expected one of {', '.join(WRITE_MODES)}")
    if on_bad_image not in ("skip", "error"):
        raise ValueError(f"on_bad_image = {on_bad_image!r}: expected skip or error")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality = {jpeg_quality}: expected 1..100")
    if not 0.0 <= compress_probability <= 1.0:
        raise ValueError(f"compress_probability = {compress_probability}: expected a probability")
    if max_resolution is not None and max_resolution < 8:
        raise ValueError(f"max_resolution = {max_resolution}: expected >= 8 pixels (or None)")
    num_workers = num_workers or os.cpu_count() or 1
    if isinstance(class_map, (str, os.PathLike)):
        class_map = load_class_map(class_map)
    try:
        from ffcv.fields import IntField, RGBImageField
    except ImportError as err:
        raise ImportError(
            "fastbyol convert needs FFCV 1.0.2: run tools/install_ffcv.sh (Debian packages "
            "pkg-config libturbojpeg0-dev libopencv-dev, then pip install 'fastbyol[ffcv]')"
        ) from err

    paths, labels, mapping = scan_source(src, class_map, val_labels, subset)
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    classes_json = class_map_path(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    tmp_json = classes_json.with_name(f"{classes_json.name}.tmp-{os.getpid()}")

    with _progress(progress) as bar:
        skipped = _verify(paths, num_workers, on_bad_image, bar) if verify else []
        if skipped:
            bad = {p for p, _ in skipped}
            kept = [(p, l) for p, l in zip(paths, labels) if p not in bad]
            paths, labels = [p for p, _ in kept], [l for _, l in kept]
        if not paths:
            raise ValueError(f"{src}: no readable image left to write")
        errors: mp.Queue = mp.Queue()
        fields = {
            "image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                                   jpeg_quality=jpeg_quality,
                                   compress_probability=compress_probability),
            "label": IntField(),
        }
        task = bar.add_task("write  ", total=len(paths))
        writer = _make_writer(str(tmp), fields, _page_size(max_resolution),
                              min(num_workers, len(paths)),
                              lambda n: bar.advance(task, n), errors)
        dataset = ImageLabelDataset(paths, labels, max_resolution, errors)
        try:
            writer.from_indexed_dataset(dataset, chunksize=32)
            tmp_json.write_text(json.dumps(mapping, indent=1, sort_keys=True) + "\n")
            os.replace(tmp_json, classes_json)
            os.replace(tmp, out)  # last: OUT.beton exists only once it is complete
        finally:
            for leftover in (tmp, tmp_json):
                leftover.unlink(missing_ok=True)

    present = set(labels)
    return ConvertSummary(
        out=str(out), class_map_path=str(classes_json), images=len(paths), classes=len(mapping),
        bytes=out.stat().st_size, seconds=time.perf_counter() - start, skipped=skipped,
        empty_classes=sorted(n for n, i in mapping.items() if i not in present),
    )


# ----------------------------------------------------------------------------------------------
# Command line


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `fastbyol convert SRC OUT.beton` (and tools/convert_imagenet.py)."""
    parser.add_argument("src", help="ImageFolder root, ImageNet train/ or val/ folder")
    parser.add_argument("out", help="the .beton to write, e.g. train.beton (its class map goes next to it: "
                                    "train.classes.json)")
    add_writer_arguments(parser)
    parser.add_argument("--class-map", default=None, metavar="JSON",
                        help="class name -> index map to use (e.g. train's .classes.json for val)")
    parser.add_argument("--val-labels", default=None, metavar="CSV",
                        help="label CSV of a flat val folder (ImageId,PredictionString); "
                             "LOC_val_solution.csv next to SRC is found automatically")


def add_writer_arguments(parser: argparse.ArgumentParser) -> None:
    """The options shared by every conversion (no SRC/OUT)."""
    # 512 keeps ImageNet's typical 500 x 375 photos whole: a 224 crop of most of the image is then
    # shrunk, never enlarged. 256 (FFCV's low-resolution choice) leaves a short side of ~192, so
    # every crop is upsampled (README: "FFCV: stored size and resize", measured sizes and speeds).
    parser.add_argument("--max-res", type=int, default=512, metavar="PIXELS",
                        help="downsize so the long side is at most this (0: keep; default 512). "
                             "Smaller: smaller file, faster decode; larger: more detail in crops")
    parser.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality 1-100 (default 90)")
    parser.add_argument("--write-mode", choices=WRITE_MODES, default="proportion",
                        help="raw: pixels (fast to read, ~5-10x larger); jpg: smallest, decoded every "
                             "epoch; proportion: JPEG with --compress-probability, else raw (default)")
    parser.add_argument("--compress-probability", type=float, default=0.5,
                        help="share of images stored as JPEG in proportion mode (default 0.5)")
    parser.add_argument("--workers", type=int, default=None,
                        help="decode/encode processes (default: all cores)")
    parser.add_argument("--subset", type=int, default=None, metavar="N",
                        help="only the first N images of each class (quick trials)")
    parser.add_argument("--on-bad-image", choices=("skip", "error"), default="skip",
                        help="an unreadable file: report and skip it (default), or stop")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip the decode check before writing (a bad file is then fatal)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar")


def writer_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of `convert` from parsed add_writer_arguments options."""
    return dict(
        max_resolution=args.max_res or None, jpeg_quality=args.jpeg_quality,
        write_mode=args.write_mode, compress_probability=args.compress_probability,
        num_workers=args.workers, subset=args.subset, on_bad_image=args.on_bad_image,
        verify=args.verify, progress=args.progress,
    )


def run_convert(args: argparse.Namespace) -> int:
    """Run `fastbyol convert` from parsed arguments; 0 on success, 2 on bad input (as `fastbyol train`),
    1 when a worker process died, 130 on Ctrl-C."""
    try:
        summary = convert(args.src, args.out, class_map=args.class_map,
                          val_labels=args.val_labels, **writer_options(args))
    except KeyboardInterrupt:
        print(f"fastbyol convert: interrupted; {args.out} was not written", file=sys.stderr)
        return 130
    except (OSError, ValueError, ImportError) as err:  # bad input: the same exit code as `fastbyol train`
        print(f"fastbyol convert: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # a worker died
        print(f"fastbyol convert: error: {err}", file=sys.stderr)
        return 1
    print(summary.report())
    return 0
