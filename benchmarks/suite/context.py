"""What a stage function is given: the sizes, the device, the folders, and a way to save as it goes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from benchmarks.suite.sizes import Sizes


@dataclass(frozen=True)
class Context:
    """One stage's world. `save(partial)` records what is measured so far (a killed stage keeps it)."""

    sizes: Sizes
    device: str  # "cuda" | "cpu"
    work: Path  # scratch that a later run on the same machine reuses: images, .beton, installed wheels
    out: Path  # what comes back: results.jsonl, results.md, suite.log, step_time_vs_batch.jsonl
    run_id: str
    save: Callable[[dict[str, Any]], None]

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def precision(self) -> str:
        return "bf16" if self.cuda else "fp32"  # bf16 autocast is far slower than fp32 on CPUs
