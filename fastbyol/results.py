"""Evaluation results on disk: one indented JSON file per protocol, written atomically."""

from __future__ import annotations

import os
from pathlib import Path

from fastbyol.atomic import atomic_write_json


def default_result_path(source: str | os.PathLike, name: str) -> Path:
    """Where a result goes by default: RUN_DIR/eval_<name>.json, or <file stem>_eval_<name>.json."""
    source = Path(source)
    if source.is_dir():
        return source / f"eval_{name}.json"
    return source.with_name(f"{source.stem}_eval_{name}.json")


def write_result(result: dict, path: str | os.PathLike) -> Path:
    """Write `result` as indented JSON, atomically and durably (fastbyol.atomic)."""
    return atomic_write_json(result, path)


__all__ = ["default_result_path", "write_result"]
