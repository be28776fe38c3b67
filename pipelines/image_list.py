"""A verified image list: every file decoded once (the converter's check), cached by size and mtime.

DALI decodes inside its pipeline and stops the whole run at the first file it cannot decode,
without naming it. So the DALI backend first checks its list: each file is decoded the way
`fastbyol convert` checks it (pipelines.images.check_image; JPEGs at 1/8 scale, which still
reads every byte) and its size is read. The answer is cached per file, keyed by its size and
modification time, in $FASTBYOL_CACHE (default ~/.cache/fastbyol)/verified/: the next start
only stats the files. `on_bad_image` then decides: skip drops the bad files by path (each named
once), error stops with the first one named.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image

from pipelines.images import BadImageError, BadImageWarning, check_image


@dataclass
class ImageList:
    """The readable images of a list, with each one's decoded height and width."""

    paths: list[str]
    labels: list[int]
    heights: list[int]
    widths: list[int]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of dropped files


def inspect_image(path: str) -> tuple[str | None, int, int]:
    """(None, height, width) for a file that decodes, else (reason, 0, 0)."""
    reason = check_image(path)
    if reason is not None:
        return reason, 0, 0
    with Image.open(path) as image:
        width, height = image.size
    return None, height, width


def cache_dir() -> Path:
    return Path(os.environ.get("FASTBYOL_CACHE", Path.home() / ".cache" / "fastbyol")).expanduser() / "verified"


def _key(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def verify_images(paths: Sequence[str], labels: Sequence[int], on_bad_image: str = "skip",
                  num_workers: int = 1, name: str = "") -> ImageList:
    """The images of `paths` that decode (skip), or BadImageError naming the first that does not
    (error). `name` (e.g. data.path) names the cache file; unchanged files are not decoded again."""
    cache_file = cache_dir() / (hashlib.sha1((name or "\n".join(paths)).encode()).hexdigest()[:20] + ".json")
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    keys, todo = {}, []
    for p in paths:
        try:
            keys[p] = _key(p)
        except OSError as err:  # listed, but gone or unreadable
            cache[p] = [-1, -1, f"{type(err).__name__}: {err}", 0, 0]
            continue
        entry = cache.get(p)
        if entry is None or entry[:2] != keys[p]:
            todo.append(p)
    if todo:
        # threads: PIL decodes without the GIL, and a thread pool needs no __main__ guard in the
        # user's script nor a fork of a process that may already run DALI or CUDA threads
        with ThreadPoolExecutor(max(1, num_workers)) as pool:
            found = list(pool.map(inspect_image, todo))
        for p, (reason, h, w) in zip(todo, found):
            cache[p] = [*keys[p], reason, h, w]
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({p: cache[p] for p in paths if p in cache}))
            os.replace(tmp, cache_file)
        except OSError as err:  # a read-only home: verify again next time
            warnings.warn(f"cannot write the image check cache {cache_file}: {err}")
    out = ImageList([], [], [], [])
    for p, label in zip(paths, labels):
        _, _, reason, h, w = cache[p]
        if reason is None:
            out.paths.append(p)
            out.labels.append(label)
            out.heights.append(h)
            out.widths.append(w)
            continue
        if on_bad_image == "error":
            raise BadImageError(f"{p}: cannot decode image ({reason}); fix or remove it, "
                                "or set data.on_bad_image=skip")
        out.skipped.append((p, reason))
        warnings.warn(f"skipping bad image {p}: {reason}", BadImageWarning, stacklevel=2)
    if not out.paths:
        raise BadImageError(f"none of the {len(paths)} images (e.g. {paths[0]}) could be decoded")
    return out


__all__ = ["BadImageWarning", "ImageList", "cache_dir", "inspect_image", "verify_images"]
