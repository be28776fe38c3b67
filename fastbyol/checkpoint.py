"""Checkpoints: one plain dict, written atomically, the newest K kept, resumed from the newest.

Every file of a run directory (checkpoints, encoder.pt, config.yaml, the truncated metrics.jsonl)
is written by fastbyol.atomic: a crash or a kill mid-write leaves at most a stray `.NAME.*.tmp`
file, never a half-written file under a real name, and the next start removes the strays.
Loading takes the newest checkpoint that loads.

Every file is loaded with torch.load(weights_only=True): a checkpoint holds only tensors and plain
types (dicts, lists, numbers, strings), and a file that holds anything else (an object whose
unpickling calls code) is refused unread, wherever it came from.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from fastbyol import atomic

CHECKPOINT_RE = re.compile(r"checkpoint_(\d{9})\.pt$")


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


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save `obj` to `path` so that `path` is either the old file or the complete new one."""
    atomic.atomic_write(path, lambda f: torch.save(obj, f))


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
