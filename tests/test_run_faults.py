"""What a run does when it goes wrong on its own: divergence, a second process in its directory,
a full disk, a second Ctrl-C mid-write (issue 22). Each test first reproduces the fault as the probe
met it, then checks the rule of README's "Faults and what happens" table. Where a run is involved,
the truth is the CLI's contract (exit code, one line on stderr) and the files left in the run
directory, read back independently (torch.load, math.isfinite)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from fastbyol import atomic, checkpoint
from fastbyol.cli import main

pytestmark = pytest.mark.usefixtures("one_thread_module")

TINY = {
    "data": {"backend": "synthetic", "batch_size": 8, "synthetic_steps": 8, "num_workers": 0},
    "model": {"depth": 18, "stem": "cifar"},
    "byol": {"hidden_dim": 64, "proj_dim": 32},
    "augment": {"view1": {"crop_size": 16}, "view2": {"crop_size": 16}},
    "train": {"epochs": 1, "precision": "fp32", "device": "cpu"},
    "logging": {"progress": "none", "log_every": 1, "plot": False},
}


def write_config(tmp_path: Path, **sections: dict) -> Path:
    cfg = json.loads(json.dumps(TINY))
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    cfg["train"].setdefault("run_dir", str(tmp_path / "run"))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_cli(config: Path, capsys, *overrides: str) -> tuple[int, list[str]]:
    """`fastbyol train` in this process: (exit code, stderr lines)."""
    capsys.readouterr()
    rc = main(["train", str(config), *overrides])
    return rc, capsys.readouterr().err.strip().splitlines()


def finite(state: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- divergence


def test_a_nan_loss_stops_the_run_naming_the_step(tmp_path, capsys):
    # lr 1e30: the step-2 update (the first with lr > 0) makes the weights non-finite, the loss of
    # step 3 is NaN. The probe's run carried on to the end with exit 0 ("final loss nan").
    config = write_config(tmp_path, optim={"lr": 1e30}, train={"checkpoint_every": 100})
    rc, err = train_cli(config, capsys)
    assert rc == 3, err
    assert len(err) == 1 and "step 3" in err[0] and "not finite" in err[0], err
    assert "no finite checkpoint" in err[0]
    run = tmp_path / "run"
    assert checkpoint.list_checkpoints(run) == [] and not (run / "encoder.pt").exists()
    assert [r["step"] for r in records(run)][-1] == 3 and math.isfinite(records(run)[0]["loss"])


def test_a_diverged_run_keeps_its_newest_finite_checkpoint(tmp_path, capsys):
    # checkpoints every step, the loss read every 4th: the step-3 update makes the weights NaN, so
    # the step-3 checkpoint would hold them and, with keep_checkpoints 1, rotation would delete the
    # finite step-2 checkpoint for it (the probe: every kept checkpoint and encoder.pt were NaN)
    config = write_config(tmp_path, optim={"lr": 1e30}, logging={"log_every": 4},
                          train={"checkpoint_every": 1, "keep_checkpoints": 1})
    rc, err = train_cli(config, capsys)
    assert rc == 3, err
    assert len(err) == 1 and "weights are not finite after step 3" in err[0], err
    assert "the newest finite checkpoint is" in err[0] and "checkpoint_000000002.pt (kept)" in err[0], err
    run = tmp_path / "run"
    (kept,) = checkpoint.list_checkpoints(run)
    assert kept.name == "checkpoint_000000002.pt" and finite(torch.load(kept)["model"])
    assert not (run / "encoder.pt").exists()
    rc, err = train_cli(config, capsys)  # the same command again resumes from it, and stops again
    assert rc == 3 and "after step 3" in err[-1], err
    assert checkpoint.list_checkpoints(run) == [kept]


def test_eval_and_export_refuse_non_finite_weights(tmp_path, capsys):
    config = write_config(tmp_path, train={"max_steps": 1})
    rc, err = train_cli(config, capsys)
    assert rc == 0, err
    run = tmp_path / "run"
    (path,) = checkpoint.list_checkpoints(run)
    state = torch.load(path)
    state["model"]["online_encoder.layer1.0.conv1.weight"][0, 0, 0, 0] = math.nan  # as a diverged run left them
    torch.save(state, path)
    for argv in (["export", str(run), str(tmp_path / "out.pt")], ["eval", "knn", str(run), "--train", "x", "--val", "y"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "not finite" in err[0] and "layer1.0.conv1.weight" in err[0], err
    assert not (tmp_path / "out.pt").exists()


def test_fp16_records_the_steps_the_grad_scaler_skipped(tmp_path, capsys):
    # The grad scaler starts at 2**16 and halves its scale on every step it skips (an inf or NaN
    # gradient); it grows again only after 2000 good steps. So over a short run the steps skipped
    # are log2(2**16 / final scale): the truth the records' skipped_steps must add up to.
    config = write_config(tmp_path, train={"precision": "fp16", "max_steps": 6})
    rc, err = train_cli(config, capsys)
    assert rc == 0, err
    rows = records(tmp_path / "run")
    scale = torch.load(checkpoint.list_checkpoints(tmp_path / "run")[-1])["scaler"]["scale"]
    assert sum(r["skipped_steps"] for r in rows) == round(math.log2(2**16 / scale))
    assert all(r["skipped_steps"] in (0, 1) for r in rows)  # log_every 1: one step per record


# ---------------------------------------------------------------- one process per run directory

HOLD = """
import sys, time
from pathlib import Path
from fastbyol import rundir
lock = rundir.lock_run_dir(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(600)
"""


def hold_lock(run: Path):
    """A second, real process holding the run directory's lock as `fastbyol train` takes it."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def files(run: Path) -> dict[str, bytes]:
    """The run directory's files and their bytes, the lock file (whose holder writes it) aside."""
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}


def test_a_second_process_in_a_live_run_directory_is_refused_naming_the_holder(tmp_path, capsys):
    import signal
    import socket

    config = write_config(tmp_path, train={"max_steps": 2})
    run = tmp_path / "run"
    assert train_cli(config, capsys)[0] == 0
    before = files(run)
    holder = hold_lock(run)
    try:
        # the probe: a second start resumed from the live run's checkpoint, a --no-resume one moved
        # the live run's files to replaced/, a shorter one wrote encoder.pt into the live directory
        for extra in ([], ["--no-resume"], ["train.max_steps=1"], ["train.max_steps=4"]):
            rc, err = train_cli(config, capsys, *extra)
            assert rc == 2 and len(err) == 1, err
            assert f"PID {holder.pid} on {socket.gethostname()}" in err[0], err
            assert files(run) == before
            assert not (run / "replaced").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # kill -9: the OS releases the lock, nothing else does
        holder.wait()
    rc, err = train_cli(config, capsys, "train.max_steps=4")
    assert rc == 0, err
    assert [r["step"] for r in records(run)] == [1, 2, 3, 4]


# ---------------------------------------------------------------- a full disk, a second Ctrl-C mid-write


def checkpoint_bytes(tmp_path: Path) -> int:
    """The size of one checkpoint of the tiny config (written by a 1-step run)."""
    (tmp_path / "probe").mkdir()
    config = write_config(tmp_path / "probe", train={"max_steps": 1, "run_dir": str(tmp_path / "probe" / "run")})
    assert main(["train", str(config)]) == 0
    return checkpoint.list_checkpoints(tmp_path / "probe" / "run")[0].stat().st_size


@pytest.fixture
def small_tmpfs(tmp_path):
    """A mount point factory: a real tmpfs of the given size (needs root and mount; skipped otherwise)."""
    import subprocess

    mounted = []

    def mount(size: int) -> Path:
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); the injected ENOSPC test covers it")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


def test_a_full_disk_is_one_line_and_the_files_stay_whole(tmp_path, capsys, small_tmpfs):
    # A real ENOSPC: a tmpfs with room for 1.5 checkpoints. The second checkpoint does not fit while
    # the first is kept; the probe saw a 40-line traceback ending in "unexpected pos".
    size = checkpoint_bytes(tmp_path)
    disk = small_tmpfs(int(size * 1.5))
    config = write_config(tmp_path, train={"max_steps": 3, "checkpoint_every": 1, "keep_checkpoints": 3,
                                           "run_dir": str(disk / "run")})
    rc, err = train_cli(config, capsys)
    assert rc == 1, err
    assert len(err) == 1, err
    assert f"no space left on tmpfs (mounted at {disk}) writing {disk / 'run' / 'checkpoint_000000002.pt'}" in err[0]
    assert f"the newest whole checkpoint is {disk / 'run' / 'checkpoint_000000001.pt'}" in err[0]
    assert checkpoint.load_weights(disk / "run" / "checkpoint_000000001.pt")["step"] == 1
    assert sorted(p.name for p in (disk / "run").iterdir()) == [".lock", "checkpoint_000000001.pt", "config.yaml",
                                                               "metrics.jsonl", "views.png"]  # no temporary file left


def test_an_enospc_injected_at_the_write_is_named_and_the_old_file_stays(tmp_path, monkeypatch):
    # Where no tmpfs can be mounted: the OSError(ENOSPC) a full disk raises, raised by the file write
    # that torch.save calls, after half the checkpoint went out
    import errno

    checkpoint.save_checkpoint({"step": 1, "w": torch.ones(1000)}, tmp_path, step=1, keep=3)
    real_fdopen = atomic.os.fdopen

    class FillsUp:
        def __init__(self, f):
            self.f, self.room = f, 2000

        def write(self, data):
            if len(data) > self.room:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.room -= len(data)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    monkeypatch.setattr(atomic.os, "fdopen", lambda *a, **k: FillsUp(real_fdopen(*a, **k)))
    with pytest.raises(atomic.NoSpaceLeft) as caught:
        checkpoint.save_checkpoint({"step": 2, "w": torch.zeros(1000)}, tmp_path, step=2, keep=3)
    monkeypatch.undo()
    assert str(caught.value).startswith("no space left on ") and str(tmp_path / "checkpoint_000000002.pt") in str(caught.value)
    assert "\n" not in str(caught.value)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_000000001.pt"]
    assert torch.equal(checkpoint.load_weights(tmp_path / "checkpoint_000000001.pt")["w"], torch.ones(1000))


def test_a_second_ctrl_c_inside_torch_save_is_an_interrupt(tmp_path, capsys, monkeypatch):
    # Both Ctrl-Cs arrive while torch.save writes the step-2 checkpoint: the first asks for a stop,
    # the second (StopFlag's "out now") raises KeyboardInterrupt inside torch.save's write, which
    # torch turns into a RuntimeError: the probe saw a traceback and exit code 1.
    import signal

    real_save = torch.save

    def save_with_two_ctrl_c(obj, f, *args, **kwargs):
        if obj.get("step") != 2:
            return real_save(obj, f, *args, **kwargs)

        class Interrupting:
            def write(self, data):
                signal.raise_signal(signal.SIGINT)  # a real signal, handled by the run's own handler
                return f.write(data)

            def flush(self):
                return f.flush()

        return real_save(obj, Interrupting(), *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", save_with_two_ctrl_c)
    config = write_config(tmp_path, train={"max_steps": 4, "checkpoint_every": 1})
    rc, err = train_cli(config, capsys)
    assert rc == 130, err
    assert len(err) == 1 and "interrupted" in err[0], err
    assert f"the newest whole checkpoint is {tmp_path / 'run' / 'checkpoint_000000001.pt'}" in err[0]
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "run")] == ["checkpoint_000000001.pt"]
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    assert checkpoint.load_weights(tmp_path / "run" / "checkpoint_000000001.pt")["step"] == 1
