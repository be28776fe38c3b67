"""TensorBoard events of a run (`logging.tensorboard: true`): metrics.jsonl's scalars and the views.

Written with torch.utils.tensorboard into RUN_DIR/tensorboard, so `tensorboard --logdir runs`
shows every run side by side. The tensorboard package is an optional extra
(`pip install 'fastbyol[tensorboard]'`). A resumed run opens its writer with a purge step just
past the checkpoint it resumes from: TensorBoard then drops what an earlier process wrote after
that checkpoint, as metrics.jsonl is cut back to it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

SUBDIR = "tensorboard"
INSTALL = "logging.tensorboard = true needs the tensorboard package: pip install 'fastbyol[tensorboard]'"
# metrics.jsonl key -> TensorBoard section (its tag is SECTION/key); knn_* keys go to "knn"
SECTIONS = {
    "loss": "byol", "cosine": "byol", "collapse_std": "byol", "skipped_steps": "byol",
    "lr": "schedule", "tau": "schedule", "epoch": "schedule",
    "images_per_sec": "speed", "loader_wait_share": "speed", "step_time_s": "speed", "mfu": "speed",
    "peak_memory_gib": "speed",
}
NOT_SCALARS = ("step", "time")  # the x axis, and the wall clock TensorBoard records itself


def require_tensorboard() -> None:
    """ImportError naming the key and the package when tensorboard is not installed."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ImportError(INSTALL)


def tag(key: str) -> str:
    """The TensorBoard tag of a metrics.jsonl key."""
    return f"knn/{key}" if key.startswith("knn") else f"{SECTIONS.get(key, 'other')}/{key}"


class TensorBoardLog:
    """One run's event writer (rank 0 only)."""

    def __init__(self, run_dir: str | Path, first_step: int = 0) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when asked for

        # records are numbered by steps done: those up to first_step are kept, later ones were trained again
        self.writer = SummaryWriter(str(Path(run_dir) / SUBDIR), purge_step=first_step + 1 if first_step else None)

    def scalars(self, record: dict[str, Any]) -> None:
        """Every number of a metrics.jsonl record, at the record's step."""
        for key, value in record.items():
            if key in NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # None (e.g. MFU on a CPU), text
            self.writer.add_scalar(tag(key), value, record["step"])
        self.writer.flush()

    def image(self, name: str, picture: Image.Image, step: int) -> None:
        self.writer.add_image(name, np.asarray(picture.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


__all__ = ["INSTALL", "SUBDIR", "TensorBoardLog", "require_tensorboard", "tag"]
