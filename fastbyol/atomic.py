"""Writing a file so that a crash leaves the old file or the complete new one, never a mix.

The one atomic write for checkpoints, run-directory files, result files, profile reports and the
GPU suite's records. The recipe, and why each step:
1. write a temporary file in the same directory: a rename is atomic only within one file system;
2. flush and fsync it: its bytes must be on disk before the name points at them, or a power loss
   after step 3 can leave the new name on an empty or partial file;
3. rename it over the final name (os.replace, atomic on POSIX): readers see old or new, whole;
4. fsync the directory: the rename itself is a change of the directory, and only this makes it
   durable (without it a power loss can bring the old file back after the write was reported).
A process killed mid-write leaves at most a `.NAME.<random>.tmp` file, never a half-written file
under a real name; `remove_stale_temp` deletes those at the next start.
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

TEMP_RE = re.compile(r"^\..+\.\w+\.tmp$")  # what atomic_write leaves behind when killed mid-write


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call `write(f)` on a temporary binary file next to `path`, then make it `path` durably:
    whenever the process dies, `path` is either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        # torch.save reports a failing write as RuntimeError("... unexpected pos ..."), the real
        # error as its context: a full disk and a second Ctrl-C are said as what they are
        if not isinstance(e, KeyboardInterrupt) and _in_chain(e, lambda x: isinstance(x, KeyboardInterrupt)):
            raise KeyboardInterrupt(f"interrupted while writing {path}, which was left as it was") from None
        if _in_chain(e, lambda x: isinstance(x, OSError) and x.errno in NO_SPACE):
            raise NoSpaceLeft(f"no space left on {file_system(path.parent)} writing {path}") from None
        raise
    fsync_dir(path.parent)
    return path


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # a full disk, a full quota


class NoSpaceLeft(OSError):
    """A write found its file system full; the message names the file system and the file, and the
    file is as it was before the write (whole)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def _in_chain(e: BaseException | None, match: Callable[[BaseException], bool]) -> bool:
    """Whether `e` or an exception it was raised from or during matches."""
    seen = set()
    while e is not None and id(e) not in seen:
        if match(e):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def file_system(folder: str | os.PathLike) -> str:
    """'DEVICE (mounted at MOUNT)' of the file system that holds `folder` (MOUNT alone if
    /proc/mounts does not say)."""
    mount = Path(os.path.abspath(folder))
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    device = None
    try:
        with open("/proc/mounts") as f:
            for line in f:  # the last entry for a mount point is the one in effect
                fields = line.split()
                if len(fields) > 1 and fields[1].replace("\\040", " ") == str(mount):
                    device = fields[0]
    except OSError:
        pass
    return f"{device} (mounted at {mount})" if device else str(mount)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make the entries of `folder` (a rename into it) durable."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """`text` (UTF-8) to `path`, atomically."""
    return atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(obj: Any, path: str | os.PathLike, default: Callable[[Any], Any] | None = None) -> Path:
    """`obj` as indented JSON (2 spaces, a final newline) to `path`, atomically. default: as json.dumps'."""
    return atomic_write_text(json.dumps(obj, indent=2, default=default) + "\n", path)


def remove_stale_temp(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed `atomic_write` left in `folder`; returns them.
    Call only when no other process writes into `folder`."""
    folder = Path(folder)
    stale = [p for p in folder.iterdir() if TEMP_RE.match(p.name) and p.is_file()] if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


__all__ = ["NO_SPACE", "NoSpaceLeft", "TEMP_RE", "atomic_write", "atomic_write_json", "atomic_write_text", "file_system", "fsync_dir", "remove_stale_temp"]
