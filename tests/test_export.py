"""Export: the online encoder's weights with torchvision's keys, from checkpoints or encoder.pt."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from fastbyol import checkpoint, cli
from fastbyol.config import dump_yaml, load_config
from fastbyol.export import build_encoder, encoder_state, export_encoder, infer_architecture, load_encoder
from fastbyol.models.resnet import STAGES, resnet
from fastbyol.step import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def make_run(run_dir: Path, depth: int, stem: str = "imagenet", steps: tuple[int, ...] = (10,)) -> list:
    """A run directory: config.yaml and one checkpoint per step, each a BYOL whose target differs from
    its online network (so an export of the wrong network is caught). Returns the BYOL modules."""
    cfg = load_config(None, ["data.path=unused", f"model.depth={depth}", f"model.stem={stem}", "byol.hidden_dim=16",
                             "byol.proj_dim=8", f"train.run_dir={run_dir}"])
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    models = []
    for i, step in enumerate(steps):
        torch.manual_seed(i)
        byol = build_model(cfg)
        with torch.no_grad():
            for p in byol.target_encoder.parameters():
                p.zero_()
        checkpoint.save_checkpoint({"model": byol.state_dict(), "step": step}, run_dir, step, keep=5)
        models.append(byol)
    return models


@pytest.mark.parametrize("depth", [18, 50])
def test_exported_keys_and_shapes_are_torchvision_minus_fc(tmp_path, depth, torchvision_keys):
    (byol,) = make_run(tmp_path / "run", depth)
    out = tmp_path / "exported" / "encoder.pt"
    info = export_encoder(tmp_path / "run", out)
    state = torch.load(out)
    assert {k: list(v.shape) for k, v in state.items()} == torchvision_keys(depth)
    assert list(state) == list(torchvision_keys(depth))  # same order as torchvision's
    online = byol.online_encoder.state_dict()
    assert all(torch.equal(state[k], online[k]) for k in state)  # the online network, not the target
    assert all(v.is_contiguous() and v.device.type == "cpu" for v in state.values())
    assert (info["depth"], info["width"], info["stem"]) == (depth, 1, "imagenet")
    assert "fc.weight, fc.bias only" in info["note"]
    assert [p.name for p in out.parent.iterdir()] == ["encoder.pt"]  # atomic: no temporary left behind


def test_torchvision_loads_the_export_missing_only_fc(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    make_run(tmp_path / "run", 18)
    export_encoder(tmp_path / "run", tmp_path / "encoder.pt")
    model = torchvision.models.resnet18()
    result = model.load_state_dict(torch.load(tmp_path / "encoder.pt"), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []


@pytest.mark.parametrize("depth", sorted(STAGES))
@pytest.mark.parametrize("width, stem", [(1, "imagenet"), (2, "cifar"), (4, "imagenet")])
def test_architecture_is_read_back_from_keys_and_shapes(depth, width, stem):
    with torch.device("meta"):
        state = resnet(depth, width, stem).state_dict()
    assert infer_architecture(state) == (depth, width, stem)


def test_non_torchvision_encoder_round_trips_into_our_resnet(tmp_path):
    torch.manual_seed(0)
    encoder = resnet(18, stem="cifar")
    torch.save(encoder.state_dict(), tmp_path / "encoder.pt")
    info = export_encoder(tmp_path / "encoder.pt", tmp_path / "copy.pt")
    assert "no torchvision counterpart" in info["note"]
    loaded = build_encoder(torch.load(tmp_path / "copy.pt"))  # architecture inferred, strict load
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(loaded.eval()(x), encoder.eval()(x))
    with pytest.raises(ValueError, match="depth=34"):
        build_encoder(torch.load(tmp_path / "copy.pt"), depth=34)


def test_newest_checkpoint_wins_then_damaged_ones_are_passed_over_then_encoder_pt(tmp_path):
    run = tmp_path / "run"
    older, newer = make_run(run, 18, stem="cifar", steps=(10, 20))
    torch.save({"conv1.weight": torch.zeros(1)}, run / "encoder.pt")  # stale, must not be used
    assert torch.equal(encoder_state(run).state["conv1.weight"], newer.online_encoder.conv1.weight)
    (run / "checkpoint_000000020.pt").write_bytes(b"half a file")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = encoder_state(run)
    assert found.source.endswith("checkpoint_000000010.pt") and caught
    assert torch.equal(found.state["conv1.weight"], older.online_encoder.conv1.weight)
    for path in checkpoint.list_checkpoints(run):
        path.unlink()
    assert encoder_state(run).source == str(run / "encoder.pt")


def test_cli_export_and_clear_errors(tmp_path, capsys):
    make_run(tmp_path / "run", 18)
    assert cli.main(["export", str(tmp_path / "run"), str(tmp_path / "out.pt")]) == 0
    assert (tmp_path / "out.pt").is_file()
    assert cli.main(["export", str(tmp_path / "nowhere"), str(tmp_path / "x.pt")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_eval_encoder_from_a_run_uses_its_config_and_random_init_is_trainings_init(tmp_path):
    make_run(tmp_path / "run", 18, stem="cifar")
    loaded = load_encoder(tmp_path / "run")
    assert (loaded.depth, loaded.stem, loaded.image_size) == (18, "cifar", 224)  # the config's crop size
    baseline = load_encoder(tmp_path / "run", random_init=True)
    cfg = load_config(tmp_path / "run" / "config.yaml")
    torch.manual_seed(cfg.train.seed)  # as build_components does before building the model
    expected = build_model(cfg).online_encoder.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in baseline.encoder.state_dict().items())


class RunsCode:
    """Unpickling this creates the file `marker`: what a hostile weights file can do (any call)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def hostile_files(tmp_path: Path) -> tuple[Path, list[Path]]:
    """A marker path and files that would create it when unpickled: a torch.save checkpoint, a
    torch.save encoder state_dict and the same in torch.save's legacy (pre-zip) format."""
    marker = tmp_path / "code_ran"
    ckpt, encoder, legacy = tmp_path / "checkpoint_000000010.pt", tmp_path / "encoder.pt", tmp_path / "legacy.pt"
    torch.save({"model": {"online_encoder.conv1.weight": torch.zeros(1)}, "step": 10, "x": RunsCode(marker)}, ckpt)
    torch.save({"conv1.weight": RunsCode(marker)}, encoder)
    torch.save({"conv1.weight": RunsCode(marker)}, legacy, _use_new_zipfile_serialization=False)
    return marker, [ckpt, encoder, legacy]


def test_the_hostile_files_do_run_code_when_unpickled(tmp_path):
    marker, files = hostile_files(tmp_path)
    for path in files:  # the fault: weights_only=False executes the pickle's calls
        torch.load(path, weights_only=False)
        assert marker.exists()
        marker.unlink()


@pytest.mark.parametrize("verb", [["export"], ["eval", "knn"]])
def test_a_weights_file_that_would_run_code_is_refused_in_one_line(tmp_path, capsys, verb):
    marker, files = hostile_files(tmp_path)
    for path in files:
        extra = [str(tmp_path / "out.pt")] if verb == ["export"] else ["--train", "x", "--val", "y"]
        assert cli.main([*verb, str(path), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(path) in err and "could run code" in err, err
        assert not marker.exists() and not (tmp_path / "out.pt").exists()


def test_a_run_dirs_checkpoint_that_would_run_code_is_passed_over(tmp_path):
    run = tmp_path / "run"
    (older,) = make_run(run, 18, stem="cifar", steps=(10,))
    marker = tmp_path / "code_ran"
    torch.save({"model": older.state_dict(), "step": 20, "x": RunsCode(marker)}, run / "checkpoint_000000020.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = encoder_state(run)
    assert not marker.exists()
    assert found.source.endswith("checkpoint_000000010.pt")
    (warning,) = [str(w.message) for w in caught]
    assert len(warning.splitlines()) == 1 and "could run code" in warning, warning
