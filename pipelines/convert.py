"""ImageNet / ImageFolder tree -> FFCV .beton (`fastbyol convert SRC OUT.beton`): the orchestration.

One conversion: scan the source (pipelines.sources: layouts, val labels, class maps), check that
every file decodes (cheaply: JPEGs at 1/8 scale, which still reads every byte; an unreadable file
is reported by path and skipped or fatal, `on_bad_image`), write the samples (pipelines.ffcv_writer)
and the class map X.classes.json next to X.beton. Writing is atomic: the file is written as
OUT.beton.tmp-<pid> and renamed at the end, so an interrupted conversion never leaves an OUT.beton
that looks complete. The options are declared with their checks (ConvertOptions, as the config's
are); the command line that fills them is at the end of this module.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipelines.images import BadImageError, check_image
from pipelines.params import check_fields, choice, in_range, param
from pipelines.sources import class_map_json, class_map_path, load_class_map, scan_source

WRITE_MODES = ("raw", "jpg", "proportion")
ON_BAD_IMAGE = ("skip", "error")
FFCV_HINT = ("fastbyol convert needs FFCV 1.0.2: run tools/install_ffcv.sh (Debian packages "
             "pkg-config libturbojpeg0-dev libopencv-dev, then pip install 'fastbyol[ffcv]')")


@dataclass
class ConvertOptions:
    """How `convert` writes; each option's check sits with its default (pipelines.params)."""

    # Long side in pixels the images are downsized to (never upsized); None keeps the original size.
    # Smaller is a smaller file and a faster decode; BYOL's random crops then come from fewer pixels
    # (256 is FFCV's ImageNet low-res choice; 400-512 keeps more detail for 224 crops at ~3x the bytes).
    max_resolution: int | None = param(512, lambda v: v is None or v >= 8, ">= 8 pixels (or None: keep the size)")
    jpeg_quality: int = in_range(90, 1, 100)  # for images stored as JPEG
    # raw (uint8 pixels: no decode cost, ~5-10x larger), jpg (smallest, every image is decoded each
    # epoch) or proportion (each image is JPEG with probability compress_probability, else raw)
    write_mode: str = choice("proportion", WRITE_MODES)
    compress_probability: float = in_range(0.5, 0.0, 1.0, "a probability in [0, 1]")
    num_workers: int | None = param(None, lambda v: v is None or v >= 1, ">= 1 processes (or None: all cores)")
    subset: int | None = param(None, lambda v: v is None or v >= 1,
                               "a positive number of images per class (or None: all)")  # first N per class
    on_bad_image: str = choice("skip", ON_BAD_IMAGE)  # skip: report the path and leave it out; error: stop
    verify: bool = True  # check that every file decodes before writing; without it a bad file is fatal mid-way
    progress: bool = True  # progress bars on stderr


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


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    class_map: str | os.PathLike | Mapping[str, int] | None = None,
    val_labels: str | os.PathLike | None = None,
    **options: Any,
) -> ConvertSummary:
    """Write the images under `src` to the FFCV file `out` (+ `out`'s .classes.json).

    class_map: {name: index} or a path to a .classes.json (e.g. train's for val); default: the
      sorted class names.
    val_labels: label CSV of a flat val folder (LOC_val_solution.csv is found automatically).
    options: fields of ConvertOptions (write_mode="raw", num_workers=2, ...), checked first.
    Returns the ConvertSummary; the .beton appears only when everything was written.
    """
    start = time.perf_counter()
    opts = ConvertOptions(**options)
    check_fields(opts, "convert")
    num_workers = opts.num_workers or os.cpu_count() or 1
    if isinstance(class_map, (str, os.PathLike)):
        class_map = load_class_map(class_map)
    paths, labels, mapping = scan_source(src, class_map, val_labels, opts.subset)  # a bad SRC first, FFCV or not
    try:
        from pipelines.ffcv_writer import write_beton
    except ImportError as err:
        raise ImportError(FFCV_HINT) from err
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    classes_json = class_map_path(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    tmp_json = classes_json.with_name(f"{classes_json.name}.tmp-{os.getpid()}")

    with _progress(opts.progress) as bar:
        skipped = _verify(paths, num_workers, opts.on_bad_image, bar) if opts.verify else []
        if skipped:
            bad = {p for p, _ in skipped}
            kept = [(p, l) for p, l in zip(paths, labels) if p not in bad]
            paths, labels = [p for p, _ in kept], [l for _, l in kept]
        if not paths:
            raise ValueError(f"{src}: no readable image left to write")
        task = bar.add_task("write  ", total=len(paths))
        try:
            write_beton(str(tmp), paths, labels, max_resolution=opts.max_resolution,
                        jpeg_quality=opts.jpeg_quality, write_mode=opts.write_mode,
                        compress_probability=opts.compress_probability, num_workers=num_workers,
                        on_advance=lambda n: bar.advance(task, n))
            tmp_json.write_text(class_map_json(mapping))
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


def _progress(enabled: bool):
    """A rich progress display on stderr (disabled: it draws nothing)."""
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
    """(path, reason) of the files that do not decode (skip), or BadImageError at the first (error)."""
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


# ---------------------------------------------------------------- command line


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
    """The options shared by every conversion (no SRC/OUT): the fields of ConvertOptions."""
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
    parser.add_argument("--on-bad-image", choices=ON_BAD_IMAGE, default="skip",
                        help="an unreadable file: report and skip it (default), or stop")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip the decode check before writing (a bad file is then fatal)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar")


def writer_options(args: argparse.Namespace) -> dict:
    """The ConvertOptions fields (keyword arguments of `convert`) from parsed add_writer_arguments options."""
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


__all__ = ["ConvertOptions", "ConvertSummary", "WRITE_MODES", "add_convert_arguments", "add_writer_arguments",
           "convert", "run_convert", "writer_options"]
