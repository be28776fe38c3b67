"""A run directory's life: which run it holds, what a start may load from it, and what it writes.

The rules (README, "Faults and what happens"):
- A directory holds one run, named by its config.yaml. A config that differs in a key that changes
  what is computed is refused; `--force` makes it a new run.
- A fresh start (`--no-resume`, or `--force` with a changed config) moves the earlier run's files
  into `replaced/<UTC time>/` first: nothing is deleted, and a changed model never meets old weights.
- A resume loads rank 0's newest checkpoint that loads, on every rank, and only if that checkpoint
  was written by the same run (its stored config agrees with this one).
- Nothing is written before the data has been found and the checkpoint chosen, so a start that
  fails leaves the directory as it was. Every write is atomic; stale temporary files are removed and
  metrics.jsonl is cut back to the resumed step when a run (re)starts.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import torch

from fastbyol import atomic, checkpoint, dist
from fastbyol.config import Config, ConfigError, dump_yaml, load_yaml, to_dict
from fastbyol.export import online_encoder_state

# Keys that may differ between a run directory's config and the config resuming it: they change
# how a run is watched, fed, stored or how long it goes on, never what one step computes.
RESUMABLE_CHANGES = ("logging.", "eval.", "train.resume", "data.num_workers", "data.prefetch", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.device", "train.run_dir", "train.epochs", "train.max_steps",
                     "dist.timeout_s")
# What a run writes besides its checkpoints (moved aside together with them on a fresh start).
RUN_FILES = ("config.yaml", "metrics.jsonl", "metrics.png", "encoder.pt", "views.png", "tensorboard")


@dataclass
class RunStart:
    """What opening a run directory found (see `open_run`)."""

    run_dir: Path
    step: int  # the step training starts from: 0 for a fresh start, the checkpoint's step on a resume
    state: dict | None = None  # the checkpoint resumed from (on every rank); None for a fresh start
    complete: bool = False  # the directory already holds every step of the run: nothing to train
    messages: list[str] = field(default_factory=list)  # for the user, in order (rank 0's; none on others)
    lock: IO[str] | None = None  # rank 0's hold on the directory (lock_run_dir); None on other ranks

    def release(self) -> None:
        """Let another process open the directory (ending the process does the same)."""
        if self.lock is not None:
            self.lock.close()
            self.lock = None


def open_run(cfg: Config, total_steps: int, force: bool, info: dist.DistInfo,
             map_location: str | torch.device = "cpu") -> RunStart:
    """Open cfg.train.run_dir for a run of `total_steps` steps, on every rank at once: decide fresh or
    resume, load the agreed checkpoint, and make the directory this run's (rank 0 writes).

    Call it once the data has been found. Rank 0 first takes the directory's lock (`lock_run_dir`),
    held until `RunStart.release()` or the process ends: a second process is refused (RunDirBusy,
    naming the holder) before it reads anything. Besides that lock file nothing is written before
    the checkpoint is chosen, and a refused start (a different run without `force`, a checkpoint a
    rank cannot load) raises ConfigError and leaves the directory as it was. A run that is complete
    already is left as it is, except for what a kill at its very end left undone (`finish_complete`).
    Makes cfg's data and eval paths absolute first, so the run's config.yaml names the same files
    from anywhere.
    """
    absolute_paths(cfg)
    run_dir = Path(cfg.train.run_dir)
    lock, error = None, None
    if info.is_main:
        try:
            lock = lock_run_dir(run_dir)
        except RunDirBusy as e:
            error = str(e)
    error = dist.broadcast_object(error)
    if error:
        raise RunDirBusy(error)
    run = RunStart(run_dir, 0, lock=lock)
    try:
        fresh = decide_fresh(cfg, run_dir, force, info)
        run.state = None if fresh else load_agreed_checkpoint(cfg, run_dir, info, map_location=map_location)
        run.step = 0 if run.state is None else run.state["step"]
        if run.step >= total_steps:
            run.complete = True
            run.messages = finish_complete(run_dir, run.state) if info.is_main else []
            return run
        run.messages = begin(cfg, run_dir, fresh, run.step) if info.is_main else []
        dist.barrier()  # no rank starts before rank 0 has made the directory this run's
    except BaseException:
        run.release()
        raise
    if run.state is not None:
        run.messages.append(f"resumed from {run.state['path']} at step {run.step}")
    return run


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for every key of two config dicts that makes them different runs. A key
    only one of them has (a version of fastbyol that added or dropped it) is not a change."""
    old, new = _flatten(old), _flatten(new)
    keys = sorted(k for k in old.keys() & new.keys() if old[k] != new[k] and not k.startswith(RESUMABLE_CHANGES))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys]


def absolute_paths(cfg: Config) -> None:
    """Data and eval paths resolved against the current directory, so that the run's config.yaml
    (read later by `fastbyol eval RUN` from anywhere) names the same files."""
    for section, key in (("data", "path"), ("eval", "train_path"), ("eval", "val_path")):
        obj = getattr(cfg, section)
        if getattr(obj, key):
            setattr(obj, key, str(Path(getattr(obj, key)).expanduser().absolute()))


def decide_fresh(cfg: Config, run_dir: Path, force: bool, info: dist.DistInfo) -> bool:
    """Whether this start is a fresh one (True) or may resume; refuses a different run without
    `force`. Rank 0 reads config.yaml and decides for every rank. Writes nothing."""
    error, fresh = None, cfg.train.resume == "never"
    if info.is_main:
        path = run_dir / "config.yaml"
        if path.is_file():
            try:
                changes = config_changes(load_yaml(path.read_text(), str(path)) or {}, to_dict(cfg))
            except ConfigError as e:  # not YAML, or a key given twice (hand-edited)
                changes = [str(e).splitlines()[0]]
            if changes and not force:
                more = f" and {len(changes) - 6} more" if len(changes) > 6 else ""
                error = (f"run directory {run_dir} holds a different run ({', '.join(changes[:6])}{more}); "
                         "choose another train.run_dir, or pass --force to start a new run there "
                         "(the earlier run's files are moved to replaced/)")
            fresh = fresh or bool(changes)
    error, fresh = dist.broadcast_object((error, fresh))
    if error:
        raise ConfigError(error)
    return fresh


def load_agreed_checkpoint(cfg: Config, run_dir: Path, info: dist.DistInfo,
                           map_location: str | torch.device = "cpu") -> dict | None:
    """Rank 0's newest checkpoint that loads, loaded by every rank from its own `run_dir`.

    Storage that is not shared can hold a different newest checkpoint on each rank: rank 0's
    choice is the one every rank loads, and a rank that lacks it (or cannot load it) fails with
    its rank and path named, on every rank at once (none is left waiting in a collective).
    """
    state, error, name = None, None, None
    if info.is_main:
        state = checkpoint.load_latest(run_dir, map_location=map_location)
        if state is not None:
            name = Path(state["path"]).name
            changes = config_changes(state.get("config") or {}, to_dict(cfg))
            if changes:
                error = (f"checkpoint {state['path']} was written by a different run ({', '.join(changes[:6])}); "
                         "move it away, or pass --no-resume to start afresh (it is moved to replaced/)")
    error, name = dist.broadcast_object((error, name))
    if name is not None and not info.is_main:
        path = (run_dir / name).absolute()
        try:
            state = checkpoint.load_weights(path, map_location=map_location)
            state["path"] = str(path)
        except FileNotFoundError:
            error = (f"rank {info.rank}: {path} does not exist, but rank 0 resumes from it; put train.run_dir "
                     "on storage every rank sees, or copy rank 0's checkpoint there")
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
            error = f"rank {info.rank}: {path} (rank 0's newest checkpoint) does not load here: {e}"
    errors = [e for e in dist.all_gather_object(error) if e]
    if errors:
        raise ConfigError("; ".join(dict.fromkeys(errors)))
    return state


def move_aside(run_dir: Path) -> Path | None:
    """Move an earlier run's checkpoints and files into run_dir/replaced/<UTC time>/; None if none."""
    files = [p for p in checkpoint.list_checkpoints(run_dir)] + [run_dir / n for n in RUN_FILES if (run_dir / n).exists()]
    files += sorted(run_dir.glob("eval_*.json"))
    if not files:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target, n = run_dir / "replaced" / stamp, 1
    while target.exists():
        n += 1
        target = run_dir / "replaced" / f"{stamp}-{n}"
    target.mkdir(parents=True)
    for p in files:
        shutil.move(p, target / p.name)
    return target


def truncate_metrics(path: Path, last_step: int) -> int:
    """Keep the metrics lines up to `last_step` (a resumed run logs the later ones again) and drop a
    line cut short by a kill; returns how many lines were dropped."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    if len(kept) != len(lines):
        atomic.atomic_write_text("".join(f"{line}\n" for line in kept), path)
    return len(lines) - len(kept)


def begin(cfg: Config, run_dir: Path, fresh: bool, step: int) -> list[str]:
    """Rank 0, once the data and the checkpoint are known good: make `run_dir` this run's.
    Returns messages for the user."""
    messages = []
    run_dir.mkdir(parents=True, exist_ok=True)
    stale = atomic.remove_stale_temp(run_dir)
    if stale:
        messages.append(f"removed {len(stale)} temporary file(s) a killed write left in {run_dir}")
    if fresh:
        moved = move_aside(run_dir)
        if moved is not None:
            messages.append(f"fresh start: the earlier run's files were moved to {moved}")
    atomic.atomic_write_text(dump_yaml(cfg), run_dir / "config.yaml")
    dropped = truncate_metrics(run_dir / "metrics.jsonl", step)
    if dropped:
        messages.append(f"metrics.jsonl: dropped {dropped} line(s) after step {step}, the step resumed from")
    return messages


def finish_complete(run_dir: Path, state: dict) -> list[str]:
    """A complete run is left as it is, except for what a kill at its very end left undone: stray
    temporary files, and encoder.pt (written after the last checkpoint). Returns what was done."""
    notes = []
    if atomic.remove_stale_temp(run_dir):
        notes.append(f"removed the temporary files a killed write left in {run_dir}")
    if not (run_dir / "encoder.pt").exists():
        checkpoint.atomic_save(online_encoder_state(state["model"]), run_dir / "encoder.pt")
        notes.append(f"wrote the missing {run_dir / 'encoder.pt'} from {state['path']}")
    return notes


LOCK_NAME = ".lock"  # stays in the run directory (never moved aside): unlinking a lock file races


class RunDirBusy(ConfigError):
    """Another live process holds the run directory's lock; the message names its PID and host."""


def lock_run_dir(run_dir: Path) -> IO[str]:
    """An exclusive lock on `run_dir` (fcntl.flock on run_dir/.lock), held while the returned file
    stays open. The OS releases it when the process ends in any way, kill -9 included, so a stale
    lock never blocks a resume. The holder's PID and host are written into the file; a second
    process gets RunDirBusy naming them. (On NFS, Linux maps flock to POSIX locks, which work across
    clients; Lustre needs its `flock` mount option.)"""
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / LOCK_NAME, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunDirBusy(f"run directory {run_dir} is in use by {holder}; wait for that run to end, "
                         "or choose another train.run_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"PID {os.getpid()} on {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())})\n")
    f.flush()
    return f


__all__ = ["LOCK_NAME", "RESUMABLE_CHANGES", "RunDirBusy", "RunStart", "config_changes", "lock_run_dir", "move_aside",
           "open_run", "truncate_metrics"]
