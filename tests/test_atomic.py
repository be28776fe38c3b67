"""fastbyol.atomic: a write killed mid-way leaves the old file whole; the durable order of the steps.

A power loss cannot be staged on a CPU test machine; what can be checked is (1) a process killed
with SIGKILL half-way through writing leaves the old file byte for byte and a temporary file that
the next start removes, and (2) the system calls are made in the order durability needs: fsync of
the new file's bytes, then the rename, then fsync of the directory holding the name. The calls are
observed, not replaced: each spy calls the real function.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fastbyol import atomic
from fastbyol.results import write_result

ROOT = Path(__file__).resolve().parents[1]
OLD = b"the old content, complete\n" * 100


def test_a_write_killed_half_way_leaves_the_old_file_whole(tmp_path):
    path = tmp_path / "record.json"
    path.write_bytes(OLD)
    child = (
        "import os, signal, sys\n"
        "from fastbyol.atomic import atomic_write\n"
        "def half(f):\n"
        "    f.write(b'{\"new\": ')\n"
        "    f.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "atomic_write(sys.argv[1], half)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", child, str(path)], env=env, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert path.read_bytes() == OLD
    stray = [p for p in tmp_path.iterdir() if p != path]
    assert len(stray) == 1 and atomic.TEMP_RE.match(stray[0].name) and stray[0].read_bytes() == b'{"new": '
    assert atomic.remove_stale_temp(tmp_path) == stray  # the next start
    assert sorted(tmp_path.iterdir()) == [path]
    atomic.atomic_write_json({"new": 1}, path)
    assert json.loads(path.read_text()) == {"new": 1} and sorted(tmp_path.iterdir()) == [path]


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(OLD)

    def fail(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic.atomic_write(path, fail)
    assert path.read_bytes() == OLD and sorted(tmp_path.iterdir()) == [path]


def test_fsync_file_then_rename_then_fsync_directory(tmp_path, monkeypatch):
    calls: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        calls.append(("fsync", st.st_ino, st.st_size))
        return real_fsync(fd)

    def replace(src, dst):
        calls.append(("replace", Path(src).parent, Path(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    out = tmp_path / "sub" / "eval_knn.json"
    write_result({"top1": 0.5}, out)  # the result files' writer goes through the one atomic write
    assert json.loads(out.read_text()) == {"top1": 0.5}
    folder = out.parent
    assert len(calls) == 3
    assert calls[0] == ("fsync", out.stat().st_ino, out.stat().st_size)  # the bytes, complete (a rename keeps the inode)
    assert calls[1] == ("replace", folder, out)  # from the same directory
    assert calls[2][:2] == ("fsync", folder.stat().st_ino)  # then the directory holding the new name
