"""views.png: the sources beside the views each backend made of them (fastbyol/views.py).

Truth: with every op off and the crop pinned to the whole image, a view is its source image,
so the picture's view cells must show the stored pixels back (the normalization undone) beside
the right source, on every backend; and `fastbyol views` draws what `fastbyol train` drew.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from fastbyol.cli import main
from fastbyol.views import batch_picture, grid_cells, view_pixels
from pipelines import AugmentConfig, DataConfig, ViewPolicy, build_loader

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
S = 16  # view side
N = 6  # images in the folder
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)  # not ImageNet's: the inverse must use the config's
TINY = ["model.depth=18", "model.stem=cifar", "byol.hidden_dim=64", "byol.proj_dim=32", "data.batch_size=4",
        "augment.view1.crop_size=16", "augment.view2.crop_size=16", "train.precision=fp32", "train.device=cpu",
        "logging.progress=none", "logging.plot=false", "data.num_workers=0", "train.max_steps=2"]


def image(i: int) -> np.ndarray:
    """Image i: a different colour ramp each (no two alike, so a misplaced source shows)."""
    y, x = np.mgrid[0:S, 0:S]
    return np.stack([(x * 15 + 7 * i) % 256, (y * 15 + 31 * i) % 256, np.full_like(x, 40 * i % 256)],
                    axis=-1).astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for i in range(N):
        (root / f"c{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(image(i)).save(root / f"c{i % 2}" / f"{i}.png")  # lossless
    return root


def identity_augment() -> AugmentConfig:
    off = ViewPolicy(crop_size=S, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0,
                     brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, grayscale_p=0.0, blur_p=0.0,
                     solarize_p=0.0)
    return AugmentConfig(off, off, mean=MEAN, std=STD)


def data_path(backend: str, folder: Path, tmp_path: Path) -> str:
    if backend != "ffcv":
        return str(folder)
    from pipelines.convert import convert

    out = tmp_path / "images.beton"
    convert(folder, out, write_mode="raw", num_workers=1, progress=False)
    return str(out)


@pytest.mark.parametrize("backend", ["folder", pytest.param("ffcv", marks=pytest.mark.ffcv),
                                     pytest.param("dali", marks=pytest.mark.dali)])
def test_with_every_op_off_each_view_shows_its_own_source(backend, folder, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTBYOL_CACHE", str(tmp_path / "cache"))  # DALI's image-check cache
    data = DataConfig(backend=backend, path=data_path(backend, folder, tmp_path), batch_size=4, num_workers=1)
    loader = build_loader(data, identity_augment(), "cpu", seed=3)
    batch = next(iter(loader.epoch(1)))
    sources = loader.sources(1, 0, 4)
    assert len(sources) == 4 and len({s.tobytes() for s in sources}) == 4
    assert {s.tobytes() for s in sources} <= {image(i).tobytes() for i in range(N)}  # as stored
    picture = batch_picture(loader, batch, 1, 0, MEAN, STD, count=4)
    for row, view in ((1, batch.view1), (2, batch.view2)):
        pixels = view_pixels(view, MEAN, STD)
        for source, shown, cell in zip(sources, pixels, grid_cells(picture, S, 4, row)):
            np.testing.assert_array_equal(cell, shown)  # the picture holds the views' pixels
            assert np.abs(shown.astype(int) - source).max() <= 1  # ... which are the source's, denormalized


def test_the_second_step_shows_the_second_batch(folder):
    loader = build_loader(DataConfig(backend="folder", path=str(folder), batch_size=2, num_workers=0),
                          identity_augment(), "cpu", seed=5)
    batches = list(loader.epoch(0))
    for step in range(len(loader)):
        shown = view_pixels(batches[step].view1, MEAN, STD)
        for source, view in zip(loader.sources(0, step, 2), shown):
            assert np.abs(view.astype(int) - source).max() <= 1


def test_train_writes_the_picture_fastbyol_views_writes(folder, tmp_path, one_thread):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"data": {"path": str(folder)}}))
    assert main(["train", str(config), *TINY, f"train.run_dir={tmp_path / 'run'}"]) == 0
    assert main(["views", str(config), *TINY, "--out", str(tmp_path / "views.png")]) == 0
    trained = np.asarray(Image.open(tmp_path / "run" / "views.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "views.png")), trained)
    assert trained.shape[:2] == (3 * (96 + 2), 56 + 4 * (96 + 2))  # source, view 1, view 2 of the batch's 4


def test_synthetic_views_have_no_source_row(tmp_path):
    out = tmp_path / "synthetic.png"
    assert main(["views", QUICKSTART, "data.backend=synthetic", "data.demo=false",
                 "augment.view1.crop_size=16", "augment.view2.crop_size=16", "data.batch_size=4",
                 "train.device=cpu", "--out", str(out), "--count", "3"]) == 0
    rows, cols = np.asarray(Image.open(out)).shape[:2]
    assert (rows, cols) == (2 * (96 + 2), 56 + 3 * (96 + 2))  # two rows of three 96 px cells


def test_a_bad_views_config_is_one_line(tmp_path, capsys):
    assert main(["views", QUICKSTART, "data.demo=false", f"data.path={tmp_path / 'nope'}"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nope") in err and len(err.strip().splitlines()) == 1
