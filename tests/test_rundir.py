"""A run directory's whole life: reruns, fresh starts, --force, failed starts, kills at any point.

Each test first reproduces a way work used to be lost (issue 15, section 1), then checks that the
directory ends as the rules in fastbyol/rundir.py say. The truth for "resumed equals uninterrupted"
is an uninterrupted run of the same config, compared bit for bit. This file is also the worker that
the SIGKILL test starts as a subprocess (see `_worker`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # when the SIGKILL test runs this file as a script
    sys.path.insert(0, str(ROOT))

from fastbyol import atomic, checkpoint, rundir  # noqa: E402
from fastbyol.cli import main  # noqa: E402
from fastbyol.config import ConfigError, load_config  # noqa: E402
from fastbyol.train import Interrupted, train  # noqa: E402

# 24 demo images, batch 8: 3 steps per epoch
TINY = {
    "data": {"backend": "folder", "batch_size": 8, "num_workers": 0},
    "model": {"depth": 18, "stem": "cifar"},
    "byol": {"hidden_dim": 64, "proj_dim": 32},
    "augment": {"view1": {"crop_size": 16}, "view2": {"crop_size": 16}},
    "optim": {"lr": 0.3, "warmup_epochs": 1},
    "train": {"epochs": 4, "precision": "fp32", "device": "cpu", "checkpoint_every": 2},
    "logging": {"progress": "none", "log_every": 1, "plot": False},
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    from pipelines.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo"), num_classes=4, images_per_class=6, size=24)


@pytest.fixture
def tiny(tmp_path, demo, one_thread) -> Path:
    """tiny.yaml in tmp_path (run_dir tmp_path/run); the test runs from tmp_path."""
    cfg = json.loads(json.dumps(TINY))
    cfg["data"]["path"] = str(demo)
    cfg["train"]["run_dir"] = str(tmp_path / "run")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def snapshot(run: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `run` with its bytes and modification time, but the lock file, which each
    start takes and signs with its PID (rundir.lock_run_dir)."""
    return {str(p.relative_to(run)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.rglob("*"))
            if p.is_file() and p.name != rundir.LOCK_NAME}


def steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_no_resume_over_a_longer_run_keeps_the_new_run(tiny, capsys):
    run = tiny.parent / "run"
    assert main(["train", str(tiny)]) == 0  # 12 steps
    old_encoder = torch.load(run / "encoder.pt")
    # the new, shorter run: its checkpoints used to be pruned as soon as written (the old run's
    # step numbers were higher), and a plain rerun then resumed the old run
    assert main(["train", str(tiny), "train.max_steps=4", "optim.lr=0.05", "--force", "--no-resume"]) == 0
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["checkpoint_000000002.pt", "checkpoint_000000004.pt"]
    assert steps_logged(run) == [1, 2, 3, 4]
    new_encoder = torch.load(run / "encoder.pt")
    assert not torch.equal(new_encoder["conv1.weight"], old_encoder["conv1.weight"])
    (moved,) = (run / "replaced").iterdir()  # the old run is kept, whole
    assert {"config.yaml", "metrics.jsonl", "encoder.pt", "checkpoint_000000012.pt"} <= {p.name for p in moved.iterdir()}
    assert torch.equal(torch.load(moved / "encoder.pt")["conv1.weight"], old_encoder["conv1.weight"])
    capsys.readouterr()
    assert main(["train", str(tiny), "train.max_steps=4", "optim.lr=0.05"]) == 0  # the same command, resuming
    assert "holds a complete run (4 steps of 4)" in capsys.readouterr().err
    assert torch.equal(torch.load(run / "encoder.pt")["conv1.weight"], new_encoder["conv1.weight"])


def test_sigint_after_no_resume_leaves_the_checkpoint_it_announces(tiny, capsys):
    run = tiny.parent / "run"
    assert main(["train", str(tiny)]) == 0

    def interrupt_at_3(step: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    cfg = load_config(tiny, ["train.resume=never"])
    with pytest.raises(Interrupted):
        train(cfg, step_hook=interrupt_at_3)
    assert [checkpoint.step_of(p) for p in checkpoint.list_checkpoints(run)] == [2, 3]
    assert checkpoint.load_latest(run)["step"] == 3


def test_rerunning_a_finished_run_says_so_and_touches_nothing(tiny, capsys):
    run = tiny.parent / "run"
    assert main(["train", str(tiny), "train.max_steps=4"]) == 0
    before = snapshot(run)
    capsys.readouterr()
    assert main(["train", str(tiny), "train.max_steps=4"]) == 0
    err = capsys.readouterr().err
    assert "holds a complete run (4 steps of 4); nothing to do" in err and "Traceback" not in err
    assert snapshot(run) == before
    # a longer run continues it
    assert main(["train", str(tiny), "train.max_steps=6"]) == 0
    assert checkpoint.load_latest(run)["step"] == 6
    assert steps_logged(run) == [1, 2, 3, 4, 5, 6]


def test_force_with_a_changed_model_starts_a_new_run_and_keeps_the_old_one(tiny, capsys):
    from fastbyol.export import load_encoder

    run = tiny.parent / "run"
    assert main(["train", str(tiny), "train.max_steps=2"]) == 0
    old_config = (run / "config.yaml").read_text()
    capsys.readouterr()
    # without --force: refused, naming the change, nothing written
    before = snapshot(run)
    assert main(["train", str(tiny), "train.max_steps=2", "byol.hidden_dim=32"]) == 2
    err = capsys.readouterr().err
    assert "holds a different run (byol.hidden_dim: 64 -> 32)" in err and len(err.splitlines()) == 1
    assert snapshot(run) == before
    # with --force: a new run (it used to load the old checkpoint and die on 7 KB of state-dict keys)
    assert main(["train", str(tiny), "train.max_steps=2", "byol.hidden_dim=32", "--force"]) == 0
    state = checkpoint.load_latest(run)
    assert state["config"]["byol"]["hidden_dim"] == 32 and state["step"] == 2
    assert yaml.safe_load((run / "config.yaml").read_text())["byol"]["hidden_dim"] == 32
    (moved,) = (run / "replaced").iterdir()
    assert (moved / "config.yaml").read_text() == old_config and (moved / "checkpoint_000000002.pt").is_file()
    assert load_encoder(run).depth == 18  # the directory is consistent: eval reads it
    # and the original command is refused again as the different run it now is
    assert main(["train", str(tiny), "train.max_steps=2"]) == 2


def test_a_checkpoint_of_another_run_is_refused_in_one_line(tiny, capsys):
    run = tiny.parent / "run"
    assert main(["train", str(tiny), "train.max_steps=2"]) == 0
    (run / "config.yaml").unlink()  # e.g. a checkpoint copied into a fresh directory by hand
    capsys.readouterr()
    assert main(["train", str(tiny), "train.max_steps=2", "byol.hidden_dim=32"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint_000000002.pt was written by a different run (byol.hidden_dim: 64 -> 32)" in err
    assert len(err.splitlines()) == 1


def test_a_failed_start_leaves_the_run_dir_as_it_was(tiny, capsys):
    run = tiny.parent / "run"
    assert main(["train", str(tiny), "data.path=/nope/train"]) == 2
    assert "/nope/train" in capsys.readouterr().err
    assert not run.exists()
    assert main(["train", str(tiny), "train.max_steps=2"]) == 0  # the corrected command is not "a different run"
    before = snapshot(run)
    assert main(["train", str(tiny), "train.max_steps=4", "data.path=/nope/train", "--force"]) == 2
    assert snapshot(run) == before


def test_relative_data_paths_are_stored_absolute(tiny, demo, monkeypatch):
    monkeypatch.chdir(demo.parent)
    assert main(["train", str(tiny), "train.max_steps=1", f"data.path={demo.name}"]) == 0
    stored = yaml.safe_load((tiny.parent / "run" / "config.yaml").read_text())
    assert stored["data"]["path"] == str(demo)


def test_metrics_are_cut_back_to_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join(rows) + "\n" + '{"step": 5, "lo')  # killed mid-line
    assert rundir.truncate_metrics(path, 2) == 3
    assert path.read_text() == "\n".join(rows[:2]) + "\n"
    assert rundir.truncate_metrics(path, 2) == 0


def test_stale_temporary_files_are_removed_and_nothing_else(tmp_path):
    keep = [tmp_path / "checkpoint_000000002.pt", tmp_path / "encoder.pt", tmp_path / "notes.tmp"]
    stale = [tmp_path / ".checkpoint_000000004.pt.k2j3_x.tmp", tmp_path / ".encoder.pt.abc123.tmp"]
    for p in keep + stale:
        p.write_bytes(b"x")
    assert sorted(atomic.remove_stale_temp(tmp_path)) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted(keep)


# ---------------------------------------------------------------- kill -9 anywhere


def _worker(argv: list[str]) -> int:
    """`python test_rundir.py CONFIG KILL`: train CONFIG and SIGKILL this process at KILL:
    step:N (after step N), write:NAME (half-way through writing NAME), rename:NAME (NAME written
    in full, before its rename), or none."""
    config, kill = argv
    what, _, arg = kill.partition(":")

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if what == "write":
        real_write = atomic.atomic_write

        def atomic_write(path, write):
            if Path(path).name != arg:
                return real_write(path, write)

            def half_then_die(f):
                f.write(b"PK\x03\x04 half")
                f.flush()
                die()

            real_write(path, half_then_die)

        atomic.atomic_write = atomic_write
    elif what == "rename":
        real_replace = os.replace

        def replace(src, dst):
            if Path(dst).name == arg:
                die()
            return real_replace(src, dst)

        os.replace = replace
    torch.set_num_threads(1)
    hook = (lambda step: die() if step == int(arg) else None) if what == "step" else None
    train(load_config(config), step_hook=hook)
    return 0


def test_sigkill_at_many_points_then_resume_equals_an_uninterrupted_run(tiny):
    run = tiny.parent / "run"
    straight_cfg = load_config(tiny, [f"train.run_dir={tiny.parent / 'straight'}"])
    train(straight_cfg)  # 12 steps, checkpoints every 2
    kills = ["step:3", "write:checkpoint_000000004.pt", "rename:checkpoint_000000006.pt", "step:9",
             "write:encoder.pt", "none"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for kill in kills:
        proc = subprocess.run([sys.executable, __file__, str(tiny), kill], env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == (0 if kill == "none" else -signal.SIGKILL), (kill, proc.stderr[-3000:])
        if kill.startswith("rename"):  # the full temporary file is there until the next start
            assert any(atomic.TEMP_RE.match(p.name) for p in run.iterdir())
        if kill == "write:encoder.pt":  # killed writing encoder.pt: none, never a 0-byte one
            assert not (run / "encoder.pt").exists()
    assert not [p.name for p in run.iterdir() if atomic.TEMP_RE.match(p.name)]  # no stale temporary file
    assert [checkpoint.step_of(p) for p in checkpoint.list_checkpoints(run)] == [8, 10, 12]
    assert steps_logged(run) == list(range(1, 13))  # in order, no step twice
    straight = tiny.parent / "straight"
    assert_same_weights(checkpoint.load_latest(run)["model"], checkpoint.load_latest(straight)["model"])
    assert_same_weights(torch.load(run / "encoder.pt"), torch.load(straight / "encoder.pt"))


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
