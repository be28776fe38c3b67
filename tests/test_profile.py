"""The throughput profiler: three finite figures, the documented JSON, a Chrome trace, clear errors
for missing backends, a slowed loader called the bottleneck, one row per sweep value.

Tiny everything (ResNet-18 cifar stem, 16 px views, hidden 64, batch 8, one or two timed steps):
the figures are not compared with any speed, only with bounds that hold by construction; the
verdict is checked as the rules (fastbyol/verdict.py, tested on recorded figures) applied to the
figures the report gives, never as a word a fast enough machine would earn.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastbyol import cli
from fastbyol.config import load_config
from fastbyol.profile import parse_sweep, profile
from fastbyol.profile_report import knobs
from fastbyol.verdict import verdict
from pipelines.demo import make_demo_dataset

pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny models: one torch thread

BATCH = 8

# The documented --json keys (module docstring of fastbyol/profile.py), written out independently.
TOP_KEYS = {"machine", "config", "world_size", "device", "steps", "warmup", "loader_delay_s", "sweep_key", "runs"}
MACHINE_KEYS = {"gpu", "gpu_memory_bytes", "cpu_count", "torch", "cuda", "cudnn", "dali", "ffcv", "python", "platform",
                "packages"}
RUN_KEYS = {"sweep_value", "batch_per_rank", "crop_size", "config", "loader", "model", "end_to_end",
            "end_to_end_over_model", "loader_over_model", "peak_memory_bytes", "optimizer_ema_share",
            "verdict", "evidence", "knobs", "trace"}
FIGURES = ("loader", "model", "end_to_end")


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(f"""
data: {{backend: synthetic, batch_size: {BATCH}, num_workers: 0, synthetic_steps: 3}}
augment: {{view1: {{crop_size: 16}}, view2: {{crop_size: 16}}}}
model: {{depth: 18, stem: cifar, channels_last: false}}
byol: {{hidden_dim: 64, proj_dim: 32}}
optim: {{warmup_epochs: 1}}
train: {{device: cpu, precision: fp32, epochs: 2, run_dir: {tmp_path / 'run'}}}
""")
    return path


def _check_figures(run: dict) -> None:
    for name in FIGURES:
        figure = run[name]
        assert figure["images_per_sec"] > 0 and math.isfinite(figure["images_per_sec"]), (name, figure)
        assert figure["per_rank"] == [pytest.approx(figure["images_per_sec"])]  # one rank: sum of one
    assert run["end_to_end_over_model"] == pytest.approx(run["end_to_end"]["images_per_sec"]
                                                          / run["model"]["images_per_sec"])
    assert 0.0 < run["optimizer_ema_share"] < 1.0
    assert run["peak_memory_bytes"] is None  # CPU
    # the verdict is the rules applied to the reported (global) figures
    word, evidence = verdict(*(run[name]["images_per_sec"] for name in FIGURES))
    assert (run["verdict"], run["evidence"]) == (word, evidence)


def test_folder_backend_figures_json_and_trace(config, tmp_path, capsys):
    data = make_demo_dataset(tmp_path / "demo", num_classes=2, images_per_class=BATCH, size=24)
    out, trace_dir = tmp_path / "out" / "profile.json", tmp_path / "traces"
    code = cli.main(["profile", str(config), "data.backend=folder", f"data.path={data}",
                     "--steps", "1", "--warmup", "1", "--json", str(out), "--trace", str(trace_dir)])
    assert code == 0
    report = json.loads(out.read_text())
    assert set(report) == TOP_KEYS
    assert set(report["machine"]) == MACHINE_KEYS
    assert report["machine"]["gpu"] == "cpu" and report["machine"]["torch"] == torch.__version__
    assert report["config"]["data"]["backend"] == "folder" and report["world_size"] == 1
    [run] = report["runs"]
    assert set(run) == RUN_KEYS
    assert (run["batch_per_rank"], run["crop_size"], run["sweep_value"]) == (BATCH, 16, None)
    _check_figures(run)
    assert all(set(k) == {"key", "current", "suggestion", "already"} for k in run["knobs"])

    trace = json.loads((trace_dir / "profile_trace_rank0.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"end_to_end_step_0", "end_to_end_step_2"} <= names
    assert run["trace"] == str(trace_dir / "profile_trace_rank0.json")

    printed = capsys.readouterr().out
    for label in ("loader only", "model only", "end to end", "verdict"):
        assert label in printed
    assert not (tmp_path / "run").exists()  # the profile never writes into train.run_dir


def test_a_slowed_loader_bounds_the_loader_figures_and_gets_its_knobs(config):
    delay = 0.2  # seconds per batch; what matters is the bound it sets, not how it compares with the step
    report = profile(config, steps=2, warmup=0, loader_delay=delay)
    [run] = report["runs"]
    _check_figures(run)
    # every loader batch (alone or feeding the step) sleeps `delay`: bounds by construction
    assert run["loader"]["images_per_sec"] <= BATCH / delay
    assert run["end_to_end"]["images_per_sec"] <= BATCH / delay
    assert run["knobs"] == knobs(load_config(config), run["verdict"], 1, None, torch.device("cpu"))
    assert report["loader_delay_s"] == delay


def test_sweep_gives_one_row_per_value(config, tmp_path, capsys):
    out = tmp_path / "sweep.json"
    assert cli.main(["profile", str(config), "--steps", "1", "--warmup", "1",
                     "--sweep", "data.batch_size=4,8", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["sweep_key"] == "data.batch_size"
    assert [r["sweep_value"] for r in report["runs"]] == ["4", "8"]
    assert [r["batch_per_rank"] for r in report["runs"]] == [4, 8]
    assert [r["config"]["data"]["batch_size"] for r in report["runs"]] == [4, 8]
    for run in report["runs"]:
        _check_figures(run)
    printed = capsys.readouterr().out
    assert "sweep of data.batch_size" in printed
    assert printed.count("│ 4 ") == 1 and printed.count("│ 8 ") == 1


@pytest.mark.parametrize("backend,module,words", [
    ("ffcv", "ffcv", ("ffcv", "pip install")),
    ("dali", "nvidia.dali", ("DALI", "pip install")),
])
def test_unavailable_backend_is_a_one_line_error(config, tmp_path, monkeypatch, capsys, backend, module, words):
    # CI may have the backend installed: make its import fail the way a missing package does.
    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setitem(sys.modules, f"{module}.loader" if backend == "ffcv" else f"{module}.plugin.pytorch", None)
    # a path that exists: a missing one is named first, backend or not (test_bad_inputs.py)
    path = tmp_path / ("data.beton" if backend == "ffcv" else "data")
    if backend == "ffcv":
        path.write_bytes(b"FFCV would read this")
    else:
        (path / "c0").mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path / "c0" / "0.png")
    code = cli.main(["profile", str(config), f"data.backend={backend}", f"data.path={path}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("error:")
    for word in words:
        assert word in err


def test_knobs_mark_what_the_config_already_uses(config):
    cfg = load_config(config, ["model.compile=true", "train.precision=bf16", "byol.concat_views=false"])
    model_side = {k["key"]: k["already"] for k in knobs(cfg, "model-bound", device=torch.device("cuda"))}
    assert model_side == {"model.channels_last": False, "train.precision": True, "model.compile": True,
                          "model.compile_mode": False, "data.batch_size": None, "byol.concat_views": False}
    # on a CPU, NHWC and bf16 are not advised (bf16 autocast is far slower than fp32 there)
    cpu_side = {k["key"] for k in knobs(cfg, "model-bound", device=torch.device("cpu"))}
    assert cpu_side == {"model.compile", "data.batch_size", "byol.concat_views"}
    dali = load_config(config, ["data.backend=dali", "data.path=x"])
    loader_side = {k["key"]: k for k in knobs(dali, "loader-bound")}
    assert loader_side["data.backend"]["already"] is True and loader_side["data.prefetch"]["already"] is False
    assert len(knobs(cfg, "balanced")) == len(knobs(cfg, "loader-bound")) + len(knobs(cfg, "model-bound"))
    contention = {k["key"]: k for k in knobs(cfg, "contention")}
    assert set(contention) == {"data.num_workers", "data.backend", "data.prefetch"}
    assert "fewer" in contention["data.num_workers"]["suggestion"]


def test_bad_sweep_and_step_counts_are_clear_errors(config, capsys):
    assert cli.main(["profile", str(config), "model.compile=true", "--warmup", "0"]) == 2
    assert "--warmup" in capsys.readouterr().err
    assert parse_sweep("data.num_workers=0, 2") == ("data.num_workers", ["0", "2"])
    assert cli.main(["profile", str(config), "--sweep", "data.batch_size"]) == 2
    assert "--sweep" in capsys.readouterr().err
    assert cli.main(["profile", str(config), "--sweep", "data.bogus=1,2"]) == 2
    assert "data.bogus" in capsys.readouterr().err
    assert cli.main(["profile", str(config), "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
