"""Evaluation results on disk: one indented JSON file per protocol, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def default_result_path(source: str | os.PathLike, name: str) -> Path:
    """Where a result goes by default: RUN_DIR/eval_<name>.json, or <file stem>_eval_<name>.json."""
    source = Path(source)
    if source.is_dir():
        return source / f"eval_{name}.json"
    return source.with_name(f"{source.stem}_eval_{name}.json")


def write_result(result: dict, path: str | os.PathLike) -> Path:
    """Write `result` as indented JSON, atomically (a temporary file renamed over `path`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


__all__ = ["default_result_path", "write_result"]
