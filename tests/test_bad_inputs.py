"""Bad input gets one clear line and exit code 2, never a traceback (issue 15, section 2).

Each case is what a new user did; the truth is the CLI's own contract: exit code 2, one line on
stderr that starts with "error:" and names the file, and the text of the message as written
(rich markup must not eat "[...]" nor choke on "[/]").
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from fastbyol.cli import error_line, main
from pipelines.sources import class_map_path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.depth=18", "model.stem=cifar", "byol.hidden_dim=64", "byol.proj_dim=32", "data.batch_size=4",
        "augment.view1.crop_size=16", "augment.view2.crop_size=16", "train.precision=fp32", "train.device=cpu",
        "logging.progress=none", "logging.plot=false", "data.num_workers=0", "train.max_steps=1"]


@pytest.fixture
def empty_config(tmp_path) -> Path:
    path = tmp_path / "empty.yaml"
    path.write_text("{}\n")
    return path


def run_train(config: Path, tmp_path: Path, capsys, *overrides: str) -> str:
    """`fastbyol train` in this process; asserts exit code 2 and one error line; returns it."""
    capsys.readouterr()
    rc = main(["train", str(config), *TINY, f"train.run_dir={tmp_path / 'run'}", *overrides])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    return err.strip()


@pytest.fixture(scope="module")
def beton(tmp_path_factory) -> Path:
    """A whole 8-image .beton written by FFCV's writer."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    class Images:
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return np.full((24, 24, 3), 30 * i, np.uint8), i

    path = tmp_path_factory.mktemp("beton") / "ok.beton"
    DatasetWriter(str(path), {"image": RGBImageField(write_mode="raw"), "label": IntField()},
                  num_workers=1).from_indexed_dataset(Images())
    return path


@pytest.mark.ffcv
def test_a_garbage_beton_is_named_in_one_line(tmp_path, empty_config, capsys, beton):
    bad = tmp_path / "garbage.beton"
    bad.write_bytes(np.random.default_rng(0).bytes(5000))
    line = run_train(empty_config, tmp_path, capsys, "data.backend=ffcv", f"data.path={bad}")
    assert f"{bad} is not an FFCV" in line and "fastbyol convert" in line


@pytest.mark.ffcv
def test_a_truncated_beton_is_named_in_one_line(tmp_path, empty_config, capsys, beton):
    cut = tmp_path / "cut.beton"
    cut.write_bytes(beton.read_bytes()[: beton.stat().st_size // 2])
    line = run_train(empty_config, tmp_path, capsys, "data.backend=ffcv", f"data.path={cut}")
    assert f"{cut} is truncated or damaged" in line


@pytest.mark.ffcv
def test_a_directory_given_as_beton_is_named_in_one_line(tmp_path, empty_config, capsys, beton):
    folder = tmp_path / "imagenet.beton"
    folder.mkdir()
    line = run_train(empty_config, tmp_path, capsys, "data.backend=ffcv", f"data.path={folder}")
    assert f"{folder} is a directory" in line


@pytest.mark.ffcv
def test_a_whole_beton_still_trains(tmp_path, empty_config, beton, one_thread):
    assert main(["train", str(empty_config), *TINY, f"train.run_dir={tmp_path / 'run'}", "data.backend=ffcv",
                 f"data.path={beton}"]) == 0


def test_a_folder_of_only_corrupt_images_is_one_line_even_from_a_worker(tmp_path, empty_config, capsys):
    for name in ("a", "b"):
        (tmp_path / "bad" / name).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "bad" / name / f"{i}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    # the worker re-raises in this process with its whole traceback in the message
    line = run_train(empty_config, tmp_path, capsys, f"data.path={tmp_path / 'bad'}", "data.num_workers=1")
    assert "none of the 6 images" in line and "could be decoded" in line and "Traceback" not in line


def test_error_text_with_brackets_is_printed_as_written(tmp_path, empty_config, capsys):
    # a path with "[/]" used to crash the printer (rich MarkupError); "[red]" used to vanish
    weird = tmp_path / "data[/]" / "[red]x[/red]"
    line = run_train(empty_config, tmp_path, capsys, f"data.path={weird}")
    assert str(weird) in line


def test_error_line_takes_the_error_out_of_a_worker_traceback():
    wrapped = OSError("Caught BadImageError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                      "call last):\n  File \"x.py\", line 1, in f\npipelines.folder.BadImageError: /d/a.jpg: "
                      "cannot decode image")
    assert error_line(wrapped) == "/d/a.jpg: cannot decode image"


def test_convert_exits_2_on_bad_input_like_train(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "out.beton")]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err


@pytest.mark.parametrize("backend,name,what", [("ffcv", "missing.beton", "no such file"),
                                               ("ffcv", "a_folder.beton", "is a directory"),
                                               ("dali", "missing_folder", "missing_folder")])
def test_a_bad_data_path_is_named_whether_or_not_the_backend_is_installed(tmp_path, empty_config, capsys,
                                                                            backend, name, what):
    """The user's mistake comes first: a fresh machine without FFCV or DALI must not answer a
    wrong path with an install hint (issue 21)."""
    path = tmp_path / name
    if name == "a_folder.beton":
        path.mkdir()
    line = run_train(empty_config, tmp_path, capsys, f"data.backend={backend}", f"data.path={path}")
    assert str(path) in line and what in line and "install" not in line


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def test_without_the_backend_a_good_path_says_what_to_install(tmp_path, empty_config, capsys):
    """Where a backend is missing and the input is fine, the one line says how to install it."""
    (tmp_path / "ok.beton").write_bytes(b"FFCV would read this")
    (tmp_path / "images" / "c0").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "c0" / "0.png")
    cases = [("ffcv", "ffcv", tmp_path / "ok.beton", "install_ffcv.sh"),
             ("dali", "nvidia.dali", tmp_path / "images", "nvidia-dali")]
    missing = [case for case in cases if not importable(case[1])]
    if not missing:
        pytest.skip("FFCV and DALI are both installed: nothing to check")
    for backend, _, path, hint in missing:
        line = run_train(empty_config, tmp_path, capsys, f"data.backend={backend}", f"data.path={path}")
        assert hint in line, line


def test_convert_help_names_the_class_map_it_writes(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert class_map_path("train.beton").name == "train.classes.json"
    assert "train.classes.json" in help_text and "OUT.classes.json" not in help_text


def test_eval_finds_the_runs_data_from_another_directory(tmp_path, monkeypatch, one_thread):
    from fastbyol.export import load_encoder
    from pipelines.demo import make_demo_dataset

    demo = make_demo_dataset(tmp_path / "data", num_classes=2, images_per_class=4, size=24)
    monkeypatch.chdir(tmp_path / "data")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"eval": {"train_path": demo.name, "val_path": demo.name}}))
    assert main(["train", str(config), *TINY, f"data.path={demo.name}", f"train.run_dir={tmp_path / 'run'}"]) == 0
    monkeypatch.chdir(tmp_path)  # elsewhere: "demo" alone would not be found here
    loaded = load_encoder(tmp_path / "run")
    assert Path(loaded.train_path) == demo and Path(loaded.val_path) == demo
    assert Path(yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["path"]) == demo


def test_no_traceback_reaches_the_terminal(tmp_path, empty_config):
    """The whole process, as a user runs it: exit code 2 and one line."""
    proc = subprocess.run([sys.executable, "-m", "fastbyol", "train", str(empty_config), *TINY,
                           f"data.path={tmp_path / 'missing[/]'}"], capture_output=True, text=True,
                          cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "missing[/]" in proc.stderr


def test_one_bad_image_class_for_every_path():
    """The converter, the folder loader and DALI's file list raise and warn with the same classes,
    so one `except BadImageError` (the CLI's, a user's) catches a bad image from any of them."""
    from pipelines import convert, folder, image_list, images

    assert folder.BadImageError is convert.BadImageError is image_list.BadImageError is images.BadImageError
    assert folder.BadImageWarning is image_list.BadImageWarning is images.BadImageWarning
