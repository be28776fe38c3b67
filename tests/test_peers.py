"""benchmarks/peers.py on a CPU with a tiny ResNet: it runs, writes its JSON, and is a fair comparison.

Fairness is checked against the BYOL loss computed here from its definition: every contender's
first-step loss on the same views and initial weights must equal
    sum over (i, j) in {(1, 2), (2, 1)} of mean_b [2 - 2 <p_i, z_j> / (|p_i| |z_j|)]
with BatchNorm statistics per view (fastbyol, lightly) or over both views (byol-pytorch, which
feeds one cat(view1, view2) batch; fastbyol-concat does the same).

Peers: each is tested where it imports (`pip install --no-deps lightly byol-pytorch` plus
`pip install einops beartype accelerate`, and a torchvision that loads beside the installed torch).
Both import torchvision at module load, and PyPI's torchvision cannot load beside a CPU-only torch
(its C extension links libtorch_cuda), so on a CPU-only machine their tests skip.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import peers  # noqa: E402

from fastbyol.config import load_config  # noqa: E402
from fastbyol.machine import MACHINE_KEYS  # noqa: E402
from fastbyol.step import build_model  # noqa: E402
from pipelines.synthetic import random_batch  # noqa: E402

TINY = ["--device", "cpu", "--depth", "18", "--stem", "cifar", "--size", "16", "--batch", "4", "--hidden", "32",
        "--proj", "16", "--steps", "2", "--warmup", "1", "--rounds", "1"]
PEERS = {"lightly": "lightly.models.utils", "byol-pytorch": "byol_pytorch"}  # the modules the harness needs


@pytest.fixture(scope="module")
def installed() -> list[str]:
    """The peers importable here (each is skipped by its own test when absent)."""
    found = []
    for name, package in PEERS.items():
        try:
            importlib.import_module(package)
        except Exception:  # not installed, or its torchvision cannot load beside this torch
            continue
        found.append(name)
    return found


@pytest.fixture(scope="module")
def built(installed, one_thread_module):
    """All contenders once, with their initial target parameters; lr 2.0 so 3 steps move the weights
    visibly (the first-step loss is taken before any update, so lr does not change it)."""
    settings = peers.Settings(depth=18, stem="cifar", size=16, batch=4, hidden=32, proj=16, steps=2, warmup=1,
                              rounds=1, device="cpu", contenders=("fastbyol", "fastbyol-concat", *installed),
                              fastbyol_overrides=("optim.lr=2.0",))
    built = peers.build_contenders(settings)
    start = {c.name: _flat(c.target_encoder) for c in built.contenders}
    return settings, built, start


@pytest.fixture(scope="module")
def result(built) -> dict:
    settings, b, _ = built
    return json.loads(json.dumps(peers.run(settings, b)))  # what --json writes


def _flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().double() for p in module.parameters()])


def _rows(result: dict) -> dict[str, dict]:
    return {row["name"]: row for row in result["contenders"]}


def _need(name: str, installed: list[str]) -> None:
    if name not in installed:
        pytest.skip(f"{name} does not import here (see benchmarks/README.md for the install)")


@pytest.fixture(scope="module")
def reference() -> dict:
    """The first-step loss from the definition, on the harness's initial weights and views."""
    cfg = load_config(None, ["data.backend=synthetic", "model.depth=18", "model.stem=cifar", "byol.hidden_dim=32",
                             "byol.proj_dim=16", "train.precision=fp32", "train.seed=0"])
    torch.manual_seed(cfg.train.seed)  # build_components seeds, then builds: the same initialisation
    byol = build_model(cfg)
    batch = random_batch(4, 16, "cpu", seed=0)

    def online(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = byol.online_projector(byol.online_encoder(x))
        return byol.predictor(y), y  # at step 1 the target equals the online network: z = y

    def loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        cos = (p.double() * z.double()).sum(1) / (p.double().pow(2).sum(1).sqrt() * z.double().pow(2).sum(1).sqrt())
        return (2 - 2 * cos).mean()

    with torch.no_grad():
        (p1, z1), (p2, z2) = online(batch.view1), online(batch.view2)
        per_view = loss(p1, z2) + loss(p2, z1)
        p, z = online(torch.cat([batch.view1, batch.view2]))
        (p1, p2), (z1, z2) = p.chunk(2), z.chunk(2)
        both = loss(p1, z2) + loss(p2, z1)
    params = sum(q.numel() for q in byol.online_parameters())
    return {"per_view": per_view.item(), "both_views": both.item(), "online_params": params}


def test_result_has_every_key(result, installed):
    assert set(peers.JSON_KEYS) <= result.keys()
    assert set(MACHINE_KEYS) <= result["machine"].keys()
    assert result["machine"]["gpu"] == "cpu" and result["machine"]["torch"] == torch.__version__
    assert result["settings"]["device"] == "cpu" and result["settings"]["batch"] == 4
    assert "fastbyol.models.resnet ResNet-18" in result["settings"]["backbone"]
    names = [row["name"] for row in result["contenders"]]
    assert names == ["fastbyol", "fastbyol-concat", *installed]
    for row in result["contenders"]:
        assert set(peers.CONTENDER_KEYS) <= row.keys()


def test_every_contender_has_a_positive_finite_rate(result):
    rows = _rows(result)
    for row in rows.values():
        assert row["status"] == "ok", row
        assert len(row["samples_images_per_sec"]) == 1  # one round
        assert math.isfinite(row["images_per_sec"]) and row["images_per_sec"] > 0
        assert row["step_ms"] == pytest.approx(1e3 * 4 / row["images_per_sec"])
        assert row["ratio_to_fastbyol"] == pytest.approx(row["images_per_sec"] / rows["fastbyol"]["images_per_sec"])


def test_the_reference_tells_the_batchnorm_groupings_apart(reference):
    # otherwise the loss checks below could not tell per-view from both-view BatchNorm
    assert abs(reference["per_view"] - reference["both_views"]) > 1e-3


def test_fastbyol_first_loss_is_the_definition(result, reference):
    rows = _rows(result)
    assert rows["fastbyol"]["first_loss"] == pytest.approx(reference["per_view"], rel=1e-5)
    assert rows["fastbyol-concat"]["first_loss"] == pytest.approx(reference["both_views"], rel=1e-5)
    assert rows["fastbyol"]["trainable_params"] == reference["online_params"]


def test_lightly_computes_the_same_loss_from_the_same_start(result, reference, installed):
    _need("lightly", installed)
    row = _rows(result)["lightly"]
    assert row["first_loss"] == pytest.approx(reference["per_view"], rel=1e-5)  # 4 + lightly's 2·(-cos) sum
    # lightly's heads drop the bias of the Linear before each BatchNorm (2 x hidden parameters)
    assert row["trainable_params"] == reference["online_params"] - 2 * 32


def test_byol_pytorch_computes_the_same_loss_from_the_same_start(result, reference, installed):
    _need("byol-pytorch", installed)
    row = _rows(result)["byol-pytorch"]
    assert row["first_loss"] == pytest.approx(reference["both_views"], rel=1e-5)
    assert row["trainable_params"] == reference["online_params"]


def test_every_contender_moves_its_target_by_ema(result, built):
    """After its 3 steps (1 warm-up + 2 timed) at lr 2.0 each contender's target has moved towards
    its online network, but only a little (tau >= 0.996): not frozen, not a copy of the online network."""
    _, b, start = built
    for c in b.contenders:
        assert torch.equal(start[c.name], start["fastbyol"]), c.name  # one initialisation for all
        target_moved = (_flat(c.target_encoder) - start[c.name]).norm()
        online_moved = (_flat(c.online_encoder) - start[c.name]).norm()
        assert online_moved > 0, c.name
        assert 0 < target_moved < 0.05 * online_moved, (c.name, target_moved.item(), online_moved.item())


def test_main_writes_the_json(tmp_path, one_thread_module):
    path = tmp_path / "out" / "peers.json"
    assert peers.main([*TINY, "--contenders", "fastbyol", "--json", str(path)]) == 0
    written = json.loads(path.read_text())
    assert set(peers.JSON_KEYS) <= written.keys()
    (row,) = written["contenders"]
    assert row["name"] == "fastbyol" and row["status"] == "ok" and row["images_per_sec"] > 0


def test_bad_settings_name_the_option():
    with pytest.raises(ValueError, match="--warmup = 0"):
        peers.Settings(warmup=0).validate()
    with pytest.raises(ValueError, match="--contenders"):
        peers.Settings(contenders=("fastbyol", "simclr")).validate()
    assert peers.main([*TINY, "--batch", "1"]) == 2
