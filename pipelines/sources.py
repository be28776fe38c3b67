"""Finding the images of a source tree and naming their classes: the one place a layout is read.

Layouts:
- ImageFolder / ImageNet train: SRC/<class>/**/<image>. Classes are the sorted folder names and an
  empty class folder still gets an index: the map must not depend on which files exist.
- ImageNet val, flat: SRC/<image> plus a label CSV such as LOC_val_solution.csv
  (`ImageId,PredictionString`; the first token of PredictionString is the synset).

Hidden files and folders are ignored, extensions (IMAGE_EXTENSIONS) match case-insensitively, and
paths are sorted within each class, so a scan gives the same order on every machine. Links are
followed, but never in a loop, and each real file is listed once (`Scan`). A class map
({class name: index}, indices 0..n-1) is stored as X.classes.json next to X.beton, so that val can
be converted with train's mapping.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from pathlib import Path
from typing import Mapping

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VAL_LABEL_FILES = ("LOC_val_solution.csv",)  # looked for in SRC and its parents (Kaggle layout)


class ScanWarning(UserWarning):
    """A scan passed over a link that leads where it has been already (named in the message)."""


class Scan:
    """One scan of a source tree. Links are followed (a class folder or image may be a link), but no
    folder is entered twice and no file is listed twice: a link back up the tree (a loop such as
    `a/self -> .`) or a second link to a folder or file already found is passed over and named in
    `passed_over`. A folder or file is known by its (device, inode): read from the directory for a
    plain file, one stat for each folder and each link."""

    def __init__(self) -> None:
        self.folders: set[tuple[int, int]] = set()
        self.files: dict[tuple[int, int], str] = {}  # identity -> the path it was listed under
        self.passed_over: list[tuple[str, str]] = []  # (path, why)

    def reserve(self, *folders: str | os.PathLike) -> None:
        """Count `folders` as scanned: a link into one of them from elsewhere is passed over (the
        root and its class folders, so that a link never files one class's images under another)."""
        for folder in folders:
            st = os.stat(folder)
            self.folders.add((st.st_dev, st.st_ino))

    def image_files(self, folder: str | os.PathLike) -> list[str]:
        """Every image file under `folder` (recursively, in sorted order, links followed), sorted."""
        found: list[str] = []
        st = os.stat(folder)
        self.folders.add((st.st_dev, st.st_ino))
        self._scan(os.fspath(folder), st, found)
        return sorted(found)

    def _scan(self, folder: str, st: os.stat_result, found: list[str]) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:  # unreadable: as os.walk, skipped
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():
                    sub = entry.stat()
                    if (sub.st_dev, sub.st_ino) in self.folders:
                        self.passed_over.append((entry.path, "a folder scanned already"))
                    else:
                        self.folders.add((sub.st_dev, sub.st_ino))
                        self._scan(entry.path, sub, found)
                    continue
                if not entry.name.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                if entry.is_symlink():
                    target = os.stat(entry.path)
                    key = (target.st_dev, target.st_ino)
                else:
                    key = (st.st_dev, entry.inode())
            except OSError:  # a broken link: listed, so that its decode names it
                found.append(entry.path)
                continue
            if key in self.files:
                self.passed_over.append((entry.path, f"the same file as {self.files[key]}"))
                continue
            self.files[key] = entry.path
            found.append(entry.path)

    def warn(self, root: str | os.PathLike) -> None:
        """One ScanWarning naming what was passed over (the first 5, relative to `root`), if anything."""
        if not self.passed_over:
            return
        names = [f"{os.path.relpath(path, root)} ({why})" for path, why in self.passed_over]
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        warnings.warn(f"{root}: passed over {len(names)} link(s) leading where the scan had been (each real "
                      f"file is listed once): {', '.join(names[:5])}{more}", ScanWarning, stacklevel=3)


def image_files(folder: str | os.PathLike) -> list[str]:
    """Every image file under `folder` (recursively, links followed, each real file once), sorted;
    a ScanWarning names the links passed over."""
    scan = Scan()
    found = scan.image_files(folder)
    scan.warn(folder)
    return found


def class_folders(root: Path) -> list[str]:
    """The sorted names of the visible folders directly under `root`."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def find_images(root: str | os.PathLike) -> tuple[list[str], list[int], list[str]]:
    """The ImageFolder / ImageNet layout under `root`: root/<class>/**/<image>.

    Returns (paths, labels, classes): image paths sorted within each class, their class indices,
    and the class folder names sorted (index i = classes[i]).
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such directory (expected an ImageFolder root)")
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a directory (expected an ImageFolder root)")
    classes = class_folders(root)
    if not classes:
        raise ValueError(
            f"{root}: no class folders; expected the ImageFolder layout {root}/<class>/<image>"
        )
    paths: list[str] = []
    labels: list[int] = []
    scan = Scan()  # one for every class: a file linked into two classes is listed once
    scan.reserve(root, *(root / name for name in classes))
    for label, name in enumerate(classes):
        found = scan.image_files(root / name)
        paths += found
        labels += [label] * len(found)
    scan.warn(root)
    if not paths:
        raise ValueError(
            f"{root}: no images in its {len(classes)} class folders "
            f"(expected files ending in {', '.join(IMAGE_EXTENSIONS)})"
        )
    return paths, labels, classes


# ---------------------------------------------------------------- ImageNet val labels


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


def _labelled_by_csv(src: Path, val_labels: str | os.PathLike) -> list[tuple[str, str]]:
    """(path, class name) of every image under `src`, the class read from the label CSV."""
    by_stem = read_val_labels(val_labels)
    paths = image_files(src)
    if not paths:
        raise ValueError(f"{src}: no images (expected files ending in {', '.join(IMAGE_EXTENSIONS)})")
    missing = [p for p in paths if Path(p).stem not in by_stem]
    if missing:
        raise ValueError(f"{len(missing)} image(s) in {src} have no row in {val_labels}, e.g. {missing[0]}")
    return [(p, by_stem[Path(p).stem]) for p in paths]


# ---------------------------------------------------------------- class maps


def class_map_path(out: str | os.PathLike) -> Path:
    """X.beton -> X.classes.json (a name not ending in .beton: NAME -> NAME.classes.json)."""
    out = Path(out)
    stem = out.name[: -len(".beton")] if out.name.endswith(".beton") else out.name
    return out.with_name(stem + ".classes.json")


def check_class_map(mapping: Mapping[str, int], where: str) -> None:
    """ValueError naming `where` unless the indices are 0..n-1, each used once."""
    if sorted(mapping.values()) != list(range(len(mapping))):
        raise ValueError(f"{where}: class indices must be 0..{len(mapping) - 1}, each used once")


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
    check_class_map(mapping, str(path))
    return mapping


def class_map_json(mapping: Mapping[str, int]) -> str:
    """The text of a .classes.json file (read back by `load_class_map`)."""
    return json.dumps(dict(mapping), indent=1, sort_keys=True) + "\n"


# ---------------------------------------------------------------- a whole source


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
    first N (>= 1) images (sorted by path) of each class. Returns (paths, labels, class_map).
    """
    src = Path(src).expanduser()
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: not a directory (expected an ImageFolder or ImageNet split)")
    subdirs = class_folders(src)
    if val_labels is None and not subdirs and any(
        f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".") for f in os.listdir(src)
    ):
        val_labels = find_val_labels(src)
        if val_labels is None:
            raise ValueError(
                f"{src}: images but no class folders; for a flat ImageNet val folder pass the "
                "label CSV (--val-labels LOC_val_solution.csv)"
            )
    if val_labels is not None:
        paths, names = (list(t) for t in zip(*_labelled_by_csv(src, val_labels)))
        folders: list[str] = []
    else:
        if set(subdirs) >= {"train", "val"}:
            raise ValueError(
                f"{src} holds train/ and val/: convert {src / 'train'} and {src / 'val'} separately "
                "(tools/convert_imagenet.py does both, val with train's class map)"
            )
        paths, indices, folders = find_images(src)
        names = [folders[i] for i in indices]

    if class_map is None:
        class_map = {name: i for i, name in enumerate(sorted(set(names) | set(folders)))}
    else:
        class_map = dict(class_map)
        check_class_map(class_map, "class_map")
        unknown = sorted(set(names) - set(class_map))
        if unknown:
            raise ValueError(
                f"{len(unknown)} class(es) of {src} are not in the class map, e.g. {unknown[0]!r}: "
                "the class map must come from a conversion of the same classes (train)"
            )
    labels = [class_map[n] for n in names]
    if subset is not None:
        paths, labels = first_per_class(paths, labels, subset)
    return paths, labels, class_map


def first_per_class(paths: list[str], labels: list[int], n: int) -> tuple[list[str], list[int]]:
    """The first `n` paths (sorted) of each label, ordered by (label, path): the same on every run."""
    kept: dict[int, int] = {}
    keep = []
    for i in sorted(range(len(paths)), key=lambda i: (labels[i], paths[i])):
        if kept.get(labels[i], 0) < n:
            kept[labels[i]] = kept.get(labels[i], 0) + 1
            keep.append(i)
    return [paths[i] for i in keep], [labels[i] for i in keep]


__all__ = [
    "IMAGE_EXTENSIONS", "Scan", "ScanWarning", "VAL_LABEL_FILES", "check_class_map", "class_folders", "class_map_json",
    "class_map_path", "find_images", "find_val_labels", "first_per_class", "image_files",
    "load_class_map", "read_val_labels", "scan_source",
]
