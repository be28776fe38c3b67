"""results.jsonl: the suite's only record. One line per saved state of a stage, appended:
"running" lines as a stage saves what it has measured, then its final line (ok, timeout, failed).

A command killed at its limit still leaves every figure measured so far in the file; the newest
line of a stage wins, so a later run of a stage replaces its row, and the files of several runs
(A and B, even from different machines) read as one table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

RESULTS = "results.jsonl"
KEYS = ("run", "stage", "status", "seconds", "budget_s", "result", "error")
RUNNING = "running"  # a partial save; as a stage's newest line: the command ended inside the stage


def record(run: str, stage: str, status: str, seconds: float, budget_s: float, result: Any, error: str = "") -> dict:
    """One line of results.jsonl (KEYS)."""
    return dict(zip(KEYS, (run, stage, status, seconds, budget_s, result, error)))


def append(path: Path, rec: dict) -> None:
    """Append `rec` as one line, flushed to the disk (the device may stop the command any moment; a
    line cut short by that is the last, and `read` stops before it)."""
    with path.open("a") as f:
        f.write(json.dumps(rec, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read(paths: Iterable[Path]) -> list[dict]:
    """Every record of the files, in file order; a file's last line, if a killed command cut it
    short, is left out."""
    out = []
    for path in paths:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
        for i, line in enumerate(lines):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                if i < len(lines) - 1:
                    raise
    return out


def latest(records: list[dict], order: Iterable[str]) -> list[dict]:
    """The newest record of each stage, in `order` (stages not in `order` follow, in file order)."""
    newest: dict[str, dict] = {}
    for r in records:
        newest.pop(r["stage"], None)
        newest[r["stage"]] = r
    order = list(order)
    return [newest[s] for s in order if s in newest] + [r for s, r in newest.items() if s not in order]


def newest(path: Path, stage: str, run: str) -> dict | None:
    """The newest result of `stage` in run `run` recorded in `path` (None if none)."""
    if not path.exists():
        return None
    found = [r for r in read([path]) if r["stage"] == stage and r["run"] == run]
    return found[-1]["result"] if found else None
