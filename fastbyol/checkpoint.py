"""Checkpoints: one plain dict, written atomically, the newest K kept, resumed from the newest.

Every file of a run directory (checkpoints, encoder.pt, config.yaml, the truncated metrics.jsonl)
is written to a temporary file in the same directory, flushed to disk, then renamed over its final
name: a crash or a kill mid-write leaves at most a stray `.NAME.*.tmp` file, never a half-written
file under a real name, and the next start removes the strays. Loading takes the newest checkpoint
that loads.

Every file is loaded with torch.load(weights_only=True): a checkpoint holds only tensors and plain
types (dicts, lists, numbers, strings), and a file that holds anything else (an object whose
unpickling calls code) is refused unread, wherever it came from.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path
from typing import IO, Any, Callable

import torch

CHECKPOINT_RE = re.compile(r"checkpoint_(\d{9})\.pt$")
TEMP_RE = re.compile(r"^\..+\.\w+\.tmp$")  # what atomic_write leaves behind when killed mid-write


class UnsafeWeights(ValueError):
    """A weights file holds more than tensors and plain types: unpickling it could run code."""


def load_weights(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """torch.load of `path` with weights_only=True: tensors and plain types only. A file holding
    anything else raises UnsafeWeights, one line naming the file and what it holds."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a paragraph about its defaults; the line naming a GLOBAL names what the
        # file would import and call. Without one the file is damaged, not hostile: re-raised as is.
        culprit = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), None)
        if culprit is None:
            raise
        raise UnsafeWeights(f"{path}: refused: it holds more than tensors and plain types ({culprit.rstrip('.')}), "
                            "and unpickling it could run code; only weights are loaded") from None


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write(f)` on a temporary file and rename it over `path`: `path` is either the old file
    or the complete new one, whenever the process dies."""
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


def file_system(folder: Path) -> str:
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


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save `obj` to `path` so that `path` is either the old file or the complete new one."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: Path) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def remove_stale_temp(run_dir: Path) -> list[Path]:
    """Delete the temporary files a killed writer left in `run_dir`; returns them.
    Call only when no other process writes into `run_dir`."""
    run_dir = Path(run_dir)
    stale = [p for p in run_dir.iterdir() if TEMP_RE.match(p.name) and p.is_file()] if run_dir.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"checkpoint_{step:09d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of `run_dir`, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=step_of)


def step_of(path: Path) -> int:
    return int(CHECKPOINT_RE.match(Path(path).name).group(1))


def save_checkpoint(state: dict, run_dir: Path, step: int, keep: int) -> Path:
    """Write `state` as the checkpoint of `step`; delete the older ones beyond the newest `keep`.

    Only checkpoints of earlier steps are pruned: the one just written is never deleted, whatever
    else the directory holds."""
    path = checkpoint_path(run_dir, step)
    atomic_save(state, path)
    older = [p for p in list_checkpoints(run_dir) if step_of(p) < step]
    for old in older[:max(0, len(older) - (keep - 1))]:
        old.unlink(missing_ok=True)
    return path


def load_latest(run_dir: Path, map_location: str | torch.device = "cpu") -> dict | None:
    """The newest checkpoint of `run_dir` that loads (a damaged one is reported and passed over)."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            state = load_weights(path, map_location=map_location)
        except UnsafeWeights as e:
            warnings.warn(f"checkpoint {e}; trying the previous one")
            continue
        except Exception as e:  # a file damaged outside our control (disk full, copied half)
            warnings.warn(f"checkpoint {path} does not load ({' '.join(str(e).split())}); trying the previous one")
            continue
        state["path"] = str(path)
        return state
    return None
