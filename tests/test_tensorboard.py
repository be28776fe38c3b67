"""logging.tensorboard: the run's events, read back with TensorBoard's own reader.

Truth: metrics.jsonl (what the run logged) and views.png (what it drew): every number of every
record must come back from the events at its step, under its section's tag, and the views image
with the picture's size.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from fastbyol.cli import main
from fastbyol.tensorboard_log import NOT_SCALARS, require_tensorboard, tag
from pipelines.demo import make_demo_dataset

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (pip install -e '.[dev]')")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

TINY = ["model.depth=18", "model.stem=cifar", "byol.hidden_dim=64", "byol.proj_dim=32", "data.batch_size=4",
        "augment.view1.crop_size=16", "augment.view2.crop_size=16", "train.precision=fp32", "train.device=cpu",
        "logging.progress=none", "logging.plot=false", "data.num_workers=0", "eval.num_workers=0"]


def events(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_the_events_hold_every_logged_number_and_the_views(tmp_path, one_thread):
    data = make_demo_dataset(tmp_path / "data", num_classes=2, images_per_class=6, size=24)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"data": {"path": str(data)},
                                      "eval": {"train_path": str(data), "val_path": str(data), "knn_every": 1}}))
    run = tmp_path / "run"
    assert main(["train", str(config), *TINY, "train.epochs=2", "logging.log_every=1", "logging.tensorboard=true",
                 f"train.run_dir={run}"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    acc = events(run)
    scalars = acc.Tags()["scalars"]
    expected: dict[str, dict[int, float]] = {}
    for record in records:
        for key, value in record.items():
            if key not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool):
                expected.setdefault(tag(key), {})[record["step"]] = value
    assert {"byol/loss", "schedule/lr", "schedule/tau", "speed/images_per_sec", "speed/loader_wait_share",
            "knn/knn_top1", "knn/knn_random_init_top1"} <= set(expected)
    assert set(scalars) == set(expected)
    for name, by_step in expected.items():
        got = {e.step: e.value for e in acc.Scalars(name)}
        assert got == pytest.approx(by_step, rel=1e-6, abs=1e-12), name  # float32 in the events
    (views,) = acc.Images("views")
    with Image.open(run / "views.png") as png:
        assert (views.width, views.height) == png.size and views.step == 0


def test_a_resumed_run_purges_what_the_lost_steps_wrote(tmp_path, one_thread):
    """Steps past the checkpoint a run resumes from are trained again: TensorBoard keeps the new ones only."""
    data = make_demo_dataset(tmp_path / "data", num_classes=2, images_per_class=8, size=24)
    common = ["configs/quickstart.yaml", *TINY, "data.demo=false", f"data.path={data}", "logging.log_every=1",
              "logging.tensorboard=true", f"train.run_dir={tmp_path / 'run'}", "eval.knn_every=0",
              "train.checkpoint_every=2", "train.max_steps=4"]
    root = Path(__file__).resolve().parents[1]
    common[0] = str(root / common[0])
    assert main(["train", *common]) == 0
    for stale in sorted((tmp_path / "run").glob("checkpoint_*4.pt")):
        stale.unlink()  # as if the process died after step 4's log lines, before its checkpoint
    assert main(["train", *common]) == 0
    steps = [e.step for e in events(tmp_path / "run").Scalars("byol/loss")]
    assert steps == [1, 2, 3, 4]


def test_without_tensorboard_the_key_and_the_package_are_named(monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ImportError, match=r"logging.tensorboard = true needs the tensorboard package"):
        require_tensorboard()
    root = Path(__file__).resolve().parents[1]
    assert main(["train", str(root / "configs" / "quickstart.yaml"), "data.backend=synthetic", "data.demo=false",
                 "logging.tensorboard=true", f"train.run_dir={tmp_path / 'run'}", "train.device=cpu"]) == 2
    assert "pip install 'fastbyol[tensorboard]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before the run directory is touched
