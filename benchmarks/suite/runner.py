"""One process per stage, each killed at its budget, all inside the run's deadline.

The parent installs the wheelhouse, then runs the stages in order. A stage's process saves its
figures to results.jsonl as it measures them (records.RUNNING lines) and rewrites results.md; when
it ends, the parent adds the stage's final line: ok, timeout or failed, with the newest figures. A
hang or crash costs one stage its budget, never the run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from benchmarks.suite import records
from benchmarks.suite.context import Context
from benchmarks.suite.install import install, library_path
from benchmarks.suite.sizes import TINY, Sizes
from benchmarks.suite.stages import BY_NAME, STAGES
from benchmarks.suite.table import markdown
from fastbyol.atomic import atomic_write_text

REPO = Path(__file__).resolve().parents[2]
ORDER = ("install A", "install B", "install all", *(s.name for s in STAGES))
MIN_START_S = 5  # a stage with less time than this left is recorded as skipped


@dataclass(frozen=True)
class Options:
    """How one run is carried out (benchmarks/gpu_suite.py's arguments)."""

    out: Path
    work: Path
    device: str
    tiny: bool
    total_s: float
    budget_scale: float
    wheelhouse: Path
    dali_parts: Path


def write_table(out: Path) -> None:
    """results.md from the newest record of each stage in results.jsonl (the old table or the whole
    new one, whenever the command is stopped)."""
    atomic_write_text(markdown(records.latest(records.read([out / records.RESULTS]), ORDER)), out / "results.md")


def run(name: str, stage_names: list[str], opts: Options) -> int:
    """Install, then each stage of `stage_names` in its own process; 0 unless the suite itself broke."""
    deadline = time.monotonic() + opts.total_s
    run_id = f"{name} {datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ}"
    opts.out.mkdir(parents=True, exist_ok=True)
    opts.work.mkdir(parents=True, exist_ok=True)
    results = opts.out / records.RESULTS

    def final(stage: str, status: str, seconds: float, budget: float, result: Any, error: str = "") -> None:
        records.append(results, records.record(run_id, stage, status, seconds, budget, result, error))
        write_table(opts.out)
        print(f"gpu_suite: {stage}: {status} in {seconds:.0f} s", flush=True)

    site = opts.work / "site"
    t = time.monotonic()
    try:
        installed = install(opts.wheelhouse, opts.dali_parts, site)
        refused = installed.get("failed", {})
        final(f"install {name}", f"{len(refused)} wheel(s) refused" if refused else "ok", time.monotonic() - t, 0,
              installed, "; ".join(f"{k}: {v}" for k, v in refused.items()))
    except (RuntimeError, OSError) as e:
        final(f"install {name}", "failed", time.monotonic() - t, 0, None, str(e))
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           # the tree first (benchmarks, fastbyol, pipelines), then the installed wheels
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), str(site), os.environ.get("PYTHONPATH")])),
           "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [*library_path(site), os.environ.get("LD_LIBRARY_PATH")]))}
    with (opts.out / "suite.log").open("a") as log:
        for stage in stage_names:
            left = deadline - time.monotonic()
            if left < MIN_START_S:
                final(stage, "skipped: the run's time is spent", 0.0, 0.0, None)
                continue
            budget = min(BY_NAME[stage].budget_s * opts.budget_scale, left)
            t = time.monotonic()
            status, error = _run_child(stage, run_id, budget, opts, env, log)
            result = records.newest(results, stage, run_id)
            if result is not None and status != "ok":
                status += ", partial result kept"
            final(stage, status, time.monotonic() - t, budget, result, error)
    print((opts.out / "results.md").read_text())
    return 0


def _run_child(stage: str, run_id: str, budget: float, opts: Options, env: dict, log: TextIO) -> tuple[str, str]:
    """(status, error) of one stage's process, killed with everything it started after `budget` s."""
    cmd = [sys.executable, "-m", "benchmarks.gpu_suite", "stage", stage, "--run-id", run_id, "--budget",
           str(budget), "--device", opts.device, "--work", str(opts.work), "--out", str(opts.out)]
    log.write(f"\n===== {stage} (budget {budget:.0f} s)\n")
    log.flush()
    proc = subprocess.Popen(cmd + (["--tiny"] if opts.tiny else []), cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_own_group_dying_with_parent)
    try:
        _, stderr = proc.communicate(timeout=budget)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        log.write(stderr or "")
        return "timeout", f"stopped after its budget of {budget:.0f} s"
    log.write(stderr)
    if proc.returncode == 0:
        return "ok", ""
    return f"failed (exit {proc.returncode})", stderr.strip()[-1500:]


def _own_group_dying_with_parent() -> None:
    """In a stage's process before exec: its own process group, so that a stage past its budget goes
    with everything it started (loader workers too); and SIGKILL when the suite's process dies, so
    that no stage outlives a command the device stopped and keeps the GPU busy into the next one."""
    os.setpgid(0, 0)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass  # not Linux: a killed suite may leave its current stage running


def child(stage: str, run_id: str, budget: float, device: str, tiny: bool, work: Path, out: Path) -> int:
    """Run one stage in this process; every save appends a RUNNING record and rewrites results.md."""
    if device == "cpu":
        import torch

        torch.set_num_threads(1)  # a busy small CPU: one thread per process is the stable choice
    start = time.monotonic()

    def save(partial: dict[str, Any]) -> None:
        records.append(out / records.RESULTS,
                       records.record(run_id, stage, records.RUNNING, time.monotonic() - start, budget, partial))
        write_table(out)

    sizes: Sizes = TINY if tiny else Sizes()
    save(BY_NAME[stage].measure(Context(sizes, device, work, out, run_id, save)))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # loader threads (DALI, FFCV, numba) may keep a normal interpreter exit waiting
