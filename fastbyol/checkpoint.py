"""Checkpoints: one plain dict, written atomically, the newest K kept, resumed from the newest.

A checkpoint is written to a temporary file in the same directory, flushed to disk, then renamed
over its final name: a crash or a kill mid-write leaves at most a stray `.tmp` file, never a
half-written checkpoint under a real name. Loading takes the newest checkpoint that loads.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_RE = re.compile(r"checkpoint_(\d{9})\.pt$")


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save `obj` to `path` so that `path` is either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"checkpoint_{step:09d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoints of `run_dir`, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def save_checkpoint(state: dict, run_dir: Path, step: int, keep: int) -> Path:
    """Write `state` as the checkpoint of `step` and delete all but the newest `keep`."""
    path = checkpoint_path(run_dir, step)
    atomic_save(state, path)
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_latest(run_dir: Path, map_location: str | torch.device = "cpu") -> dict | None:
    """The newest checkpoint of `run_dir` that loads (a damaged one is reported and passed over)."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            state = torch.load(path, map_location=map_location, weights_only=False)
        except Exception as e:  # a file damaged outside our control (disk full, copied half)
            warnings.warn(f"checkpoint {path} does not load ({e}); trying the previous one")
            continue
        state["path"] = str(path)
        return state
    return None
