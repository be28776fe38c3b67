"""Training: the loss falls, resume is exact, checkpoints survive a crash mid-write, run dirs are guarded."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from fastbyol import checkpoint
from fastbyol.config import ConfigError, load_config
from fastbyol.train import Interrupted, train
from fastbyol.verdict import verdict
from pipelines.demo import make_demo_dataset

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "model.depth=18", "model.stem=cifar", "byol.hidden_dim=64", "byol.proj_dim=32",
    "augment.view1.crop_size=16", "augment.view2.crop_size=16", "train.precision=fp32", "train.device=cpu",
    "logging.progress=none", "logging.log_every=1", "logging.plot=false", "data.num_workers=0",
]


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), num_classes=4, images_per_class=6, size=24)


def tiny_config(run_dir: Path, *overrides: str):
    return load_config(None, [*TINY, f"train.run_dir={run_dir}", *overrides])


def final_state(run_dir: Path) -> dict:
    return checkpoint.load_latest(run_dir)["model"]


def test_loss_falls_on_a_fixed_synthetic_batch(tmp_path):
    cfg = tiny_config(tmp_path / "run", "data.backend=synthetic", "data.batch_size=16", "data.synthetic_steps=12",
                      "train.epochs=1", "optim.lr=0.5", "optim.warmup_epochs=0", "byol.tau_base=0.9")
    summary = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 12 and len(rows) == 12
    assert {"step", "epoch", "loss", "lr", "tau", "images_per_sec", "collapse_std", "time",
            "loader_wait_share", "step_time_s", "mfu"} <= rows[0].keys()
    for r in rows:
        assert r["mfu"] is None and "peak_memory_gib" not in r  # a CPU: no known peak, no CUDA memory
    # The summary's time figures, computed again from the records (one step per window): wait and wall
    # summed over the windows, and the verdict's rules applied to the rates they give.
    wall = sum(r["step_time_s"] for r in rows)
    wait = sum(r["loader_wait_share"] * r["step_time_s"] for r in rows)
    images = 16 * len(rows)
    assert summary["loader_wait_share"] == pytest.approx(wait / wall, rel=1e-9)
    assert summary["step_time_s"] == pytest.approx(wall / len(rows), rel=1e-9)
    word, evidence = verdict(images / wait if wait > 0 else math.inf, images / (wall - wait), images / wall)
    assert (summary["verdict"], summary["verdict_reason"]) == (word, evidence[-1])
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert last < first - 0.5, (first, last)
    assert rows[0]["tau"] == pytest.approx(0.9) and rows[-1]["tau"] > rows[0]["tau"]


def test_loss_falls_on_folder_data(tmp_path, demo_folder):
    cfg = tiny_config(tmp_path / "run", f"data.path={demo_folder}", "data.batch_size=8", "train.epochs=4",
                      "optim.lr=0.3", "optim.warmup_epochs=0")
    train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 12  # 24 images / 8 per batch = 3 steps per epoch
    early = sum(r["loss"] for r in rows[:3]) / 3
    late = sum(r["loss"] for r in rows[-3:]) / 3
    assert late < early, (early, late)
    assert (tmp_path / "run" / "encoder.pt").exists()


def test_resume_after_interruption_is_bit_identical(tmp_path, demo_folder):
    # 24 images, batch 8: 3 steps per epoch; interrupt mid-epoch at step 4 of 9
    common = [f"data.path={demo_folder}", "data.batch_size=8", "train.epochs=3", "optim.lr=0.3",
              "optim.warmup_epochs=1", "train.checkpoint_every=100"]
    train(tiny_config(tmp_path / "straight", *common))

    def interrupt_at_4(step: int) -> None:
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        train(tiny_config(tmp_path / "resumed", *common), step_hook=interrupt_at_4)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "resumed")] == ["checkpoint_000000004.pt"]
    summary = train(tiny_config(tmp_path / "resumed", *common))
    assert summary["steps"] == 9

    straight, resumed = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    # the metrics of the resumed run continue where the first part stopped
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 10))


def test_a_crash_mid_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    checkpoint.save_checkpoint({"step": 1, "w": torch.ones(3)}, tmp_path, step=1, keep=3)

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint({"step": 2, "w": torch.zeros(3)}, tmp_path, step=2, keep=3)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_000000001.pt"]  # no temp file left either
    state = checkpoint.load_latest(tmp_path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    checkpoint.save_checkpoint({"step": 1}, tmp_path, step=1, keep=3)
    checkpoint.checkpoint_path(tmp_path, 2).write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="checkpoint_000000002.pt does not load"):
        assert checkpoint.load_latest(tmp_path)["step"] == 1


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    for step in range(1, 6):
        checkpoint.save_checkpoint({"step": step}, tmp_path, step=step, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint_000000004.pt",
                                                                        "checkpoint_000000005.pt"]


def test_a_run_dir_with_another_config_is_refused(tmp_path):
    common = ["data.backend=synthetic", "data.batch_size=4", "data.synthetic_steps=1", "train.epochs=1"]
    train(tiny_config(tmp_path / "run", *common))
    with pytest.raises(ConfigError, match=r"holds a different run \(model.depth: 18 -> 34\)"):
        train(tiny_config(tmp_path / "run", *common, "model.depth=34"))
    # watching differently is not a different run
    train(tiny_config(tmp_path / "run", *common, "logging.log_every=5"))
    # and --force takes the directory over
    train(tiny_config(tmp_path / "run", *common, "model.depth=34", "train.resume=never"), force=True)


def test_quickstart_runs_at_reduced_length(tmp_path):
    demo = tmp_path / "demo" / "train"
    cfg = load_config(ROOT / "configs" / "quickstart.yaml",
                      [f"data.path={demo}", f"train.run_dir={tmp_path / 'run'}", "train.max_steps=3", "eval.knn_every=0",
                       "logging.progress=plain", "logging.log_every=1", "data.num_workers=0"])
    summary = train(cfg)
    assert summary["steps"] == 3
    assert (demo.parent / "val").is_dir()  # the demo set was written on first use, with its val split
    run = tmp_path / "run"
    assert {"config.yaml", "metrics.jsonl", "encoder.pt", "checkpoint_000000003.pt"} <= {p.name for p in run.iterdir()}
    encoder = torch.load(run / "encoder.pt")
    assert "layer4.1.bn2.running_var" in encoder and not any(k.startswith("fc.") for k in encoder)


def test_a_checkpoint_holds_only_tensors_and_plain_types(tmp_path):
    """So that it loads with torch.load(weights_only=True): fp16 adds the grad scaler's state."""
    cfg = tiny_config(tmp_path / "run", "data.backend=synthetic", "data.batch_size=4", "data.synthetic_steps=2",
                      "train.epochs=1", "train.precision=fp16")
    train(cfg)
    (path,) = checkpoint.list_checkpoints(tmp_path / "run")

    def kinds(obj) -> set[type]:
        if isinstance(obj, dict):
            return {dict}.union(*map(kinds, obj.keys()), *map(kinds, obj.values()))
        if isinstance(obj, (list, tuple)):
            return {type(obj)}.union(*map(kinds, obj))
        return {torch.Tensor if isinstance(obj, torch.Tensor) else type(obj)}

    state = torch.load(path, weights_only=False)  # our own file: read it whole, then look at what it holds
    assert kinds(state) <= {dict, list, tuple, torch.Tensor, int, float, str, bool, type(None)}, kinds(state)
    assert state["scaler"]["scale"] > 0 and state["config"]["train"]["precision"] == "fp16"
    assert checkpoint.load_weights(path)["step"] == 2


def test_a_last_batch_of_one_image_does_not_end_the_run(tmp_path):
    # 25 images, batch 8, drop_last false: the 4th step of each epoch holds 1 image, which BatchNorm
    # cannot train on ("Expected more than 1 value per channel when training")
    folder = make_demo_dataset(tmp_path / "demo", num_classes=5, images_per_class=5, size=24)
    cfg = tiny_config(tmp_path / "run", f"data.path={folder}", "data.batch_size=8", "data.drop_last=false",
                      "train.epochs=2", "optim.lr=0.3")
    assert train(cfg)["steps"] == 8
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 8
