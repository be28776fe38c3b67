"""Evaluation: the weighted kNN vote against a brute force, features, transforms, linear / fine-tune, kNN monitor."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastbyol import cli
from fastbyol.config import load_config
from fastbyol.finetune import finetune
from fastbyol.knn import extract_features, knn_accuracy
from pipelines.labelled import EvalData, EvalImages, center_view, eval_resize, label_subset, labeled_pair
from fastbyol.metrics import read_metrics
from fastbyol.models.resnet import resnet
from fastbyol.train import train
from pipelines.demo import make_demo_splits

pytestmark = pytest.mark.usefixtures("one_thread")

COLORS = {"blue": (40, 60, 210), "green": (40, 200, 60), "red": (210, 50, 40)}


@pytest.fixture(scope="module")
def color_folders(tmp_path_factory) -> tuple[Path, Path]:
    """train/ and val/ ImageFolders of 3 classes told apart by colour (noisy 20 px images)."""
    root = tmp_path_factory.mktemp("colors")
    for split, n in (("train", 10), ("val", 6)):
        for c, (name, rgb) in enumerate(COLORS.items()):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                rng = np.random.default_rng([len(split), c, i])
                pixels = np.clip(np.array(rgb) + rng.normal(0, 45, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i:03d}.png")
    return root / "train", root / "val"


# ---------------------------------------------------------------- the kNN vote


def brute_force_knn(train_f, train_y, val_f, val_y, k, temperature, num_classes):
    """Per query, in numpy: sort all cosine similarities, sum exp(sim/T) per class over the k best."""
    train_f, val_f = train_f.double().numpy(), val_f.double().numpy()
    hits1 = hits5 = 0
    for q, y in zip(val_f, val_y.tolist()):
        sims = train_f @ q
        nearest = np.argsort(-sims)[:k]
        scores = np.zeros(num_classes)
        for j in nearest:
            scores[train_y[j]] += math.exp(sims[j] / temperature)
        # ties at zero would make the top-5 set arbitrary; the test data are made so none matters
        assert scores[y] > 0 or (scores > 0).sum() >= 5
        ranked = np.argsort(-scores, kind="stable")
        hits1 += ranked[0] == y
        hits5 += y in ranked[:5]
    return 100 * hits1 / len(val_y), 100 * hits5 / len(val_y)


def clustered(centers: torch.Tensor, n: int, noise: float, g: torch.Generator):
    """n l2-normalized points around random ones of `centers` (num_classes, dim), with their labels."""
    labels = torch.randint(0, centers.shape[0], (n,), generator=g)
    feats = F.normalize(centers[labels] + noise * torch.randn(n, centers.shape[1], generator=g), dim=1)
    return feats, labels


def random_centers(num_classes: int, dim: int, g: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(num_classes, dim, generator=g), dim=1)


@pytest.mark.parametrize("chunk_size", [None, 7])
def test_weighted_vote_matches_brute_force(chunk_size):
    g = torch.Generator().manual_seed(0)
    centers = random_centers(6, 16, g)
    train_f, train_y = clustered(centers, 300, 0.5, g)  # overlapping clusters: neither 0% nor 100%
    val_f, val_y = clustered(centers, 60, 0.5, g)
    ours = knn_accuracy(train_f, train_y, val_f, val_y, k=40, temperature=0.1, num_classes=6, chunk_size=chunk_size)
    expected = brute_force_knn(train_f, train_y, val_f, val_y, 40, 0.1, 6)
    assert ours == pytest.approx(expected)
    assert 100 / 6 < ours[0] < 100 and ours[1] >= ours[0]


def test_separable_features_give_100_percent():
    g = torch.Generator().manual_seed(1)
    centers = random_centers(10, 32, g)
    train_f, train_y = clustered(centers, 200, 0.05, g)
    val_f, val_y = clustered(centers, 100, 0.05, g)
    assert knn_accuracy(train_f, train_y, val_f, val_y, k=20, temperature=0.07, num_classes=10) == (100.0, 100.0)


def test_random_labels_are_near_chance():
    g = torch.Generator().manual_seed(2)
    train_f = F.normalize(torch.randn(4000, 32, generator=g), dim=1)
    val_f = F.normalize(torch.randn(2000, 32, generator=g), dim=1)
    train_y = torch.randint(0, 10, (4000,), generator=g)
    val_y = torch.randint(0, 10, (2000,), generator=g)
    top1, top5 = knn_accuracy(train_f, train_y, val_f, val_y, num_classes=10)
    # chance is 10% / 50%; the binomial std over 2000 queries is 0.7% / 1.1%
    assert 6 < top1 < 14 and 44 < top5 < 56
    assert top5 >= top1


def test_top5_is_everything_with_fewer_than_five_classes():
    g = torch.Generator().manual_seed(3)
    centers = random_centers(3, 8, g)
    train_f, train_y = clustered(centers, 50, 2.0, g)
    val_f, val_y = clustered(centers, 20, 2.0, g)
    top1, top5 = knn_accuracy(train_f, train_y, val_f, val_y, k=5, num_classes=3)
    assert top5 == 100.0 and top1 <= top5


# ---------------------------------------------------------------- images and features


def test_center_view_crops_the_middle_without_resampling_at_size():
    pixels = np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8)  # H 32, W 40
    out = np.array(center_view(Image.fromarray(pixels), 32, eval_resize(32)))
    assert np.array_equal(out, pixels[:, 4:36])


def test_test_resize_follows_the_paper_at_imagenet_size_and_keeps_small_images_whole():
    assert eval_resize(224) == 256
    assert eval_resize(32) == 32  # demo / CIFAR: the whole image, no 256/224 margin
    assert center_view(Image.new("RGB", (500, 375)), 224, 256).size == (224, 224)


def test_extract_features_order_normalization_mode_and_global_rng(color_folders):
    paths, labels, _, _, _ = labeled_pair(*color_folders)
    torch.manual_seed(0)
    encoder = resnet(18, stem="cifar").train()
    rng_before = torch.get_rng_state()
    feats, ys = extract_features(encoder, paths, labels, EvalImages(16, batch_size=7, num_workers=0))
    assert torch.equal(torch.get_rng_state(), rng_before)  # the kNN monitor must not shift training's RNG
    assert encoder.training  # mode restored
    assert feats.shape == (len(paths), encoder.num_features) and ys.tolist() == labels
    assert torch.allclose(feats.norm(dim=1), torch.ones(len(paths)), atol=1e-5)
    # each row is the encoding of its own image, whatever the batching
    one, _ = extract_features(encoder, paths[5:6], labels[5:6], EvalImages(16, batch_size=1, num_workers=0))
    assert torch.allclose(feats[5], one[0], atol=1e-5)


def test_raw_pixel_knn_is_the_vote_on_the_normalized_pixels(tmp_path):
    """`fastbyol eval knn --raw-pixels` against the same vote computed from the image files with
    numpy: PIL resize to the eval size, ImageNet normalization, flatten, l2-normalize, brute force."""
    folders = []
    for split, n in (("train", 12), ("val", 6)):  # a brighter quadrant per class, under heavy noise
        for c in range(3):
            (tmp_path / split / f"q{c}").mkdir(parents=True)
            for i in range(n):
                x = np.random.default_rng([len(split), c, i]).normal(110, 60, (20, 20, 3))
                x[10 * (c % 2):10 * (c % 2) + 10, 10 * (c // 2):10 * (c // 2) + 10] += 12
                Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).save(tmp_path / split / f"q{c}" / f"{i}.png")
        folders.append(tmp_path / split)
    out = tmp_path / "raw.json"
    assert cli.main(["eval", "knn", "--raw-pixels", "--train", str(folders[0]), "--val", str(folders[1]),
                     "--image-size", "12", "--k", "7", "--temperature", "0.1", "--num-workers", "0",
                     "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])

    def pixels(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
        rows, labels = [], []
        for label, cls in enumerate(sorted(p.name for p in folder.iterdir())):
            for f in sorted((folder / cls).iterdir()):
                x = np.asarray(Image.open(f).convert("RGB").resize((12, 12), Image.Resampling.BICUBIC)) / 255.0
                rows.append(((x - mean) / std).transpose(2, 0, 1).ravel())
                labels.append(label)
        return F.normalize(torch.tensor(np.array(rows)), dim=1), torch.tensor(labels)

    expected = brute_force_knn(*pixels(folders[0]), *pixels(folders[1]), 7, 0.1, 3)
    assert (result["top1"], result["top5"]) == pytest.approx(expected)
    assert result["source"] == "raw pixels" and result["num_val"] == 18 and result["image_size"] == 12
    assert 100 / 3 < result["top1"] < 100  # neither chance nor perfect: the comparison means something


def test_raw_pixel_knn_needs_a_size_and_an_encoder_is_needed_without_it(color_folders, capsys):
    folders = ["--train", str(color_folders[0]), "--val", str(color_folders[1])]
    assert cli.main(["eval", "knn", "--raw-pixels", *folders]) == 2
    assert "--image-size" in capsys.readouterr().err
    assert cli.main(["eval", "knn", *folders]) == 2
    assert "give the encoder" in capsys.readouterr().err


def test_val_classes_are_matched_to_train_classes_by_name(tmp_path, color_folders):
    train_dir, _ = color_folders
    val = tmp_path / "val" / "red"
    val.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(val / "a.png")
    _, _, _, val_labels, classes = labeled_pair(train_dir, tmp_path / "val")
    assert val_labels == [classes.index("red")]  # index 2 among train's classes, not 0


# ---------------------------------------------------------------- linear evaluation, subsets, fine-tuning


@pytest.mark.parametrize("precompute", [True, False])
def test_linear_eval_beats_chance_and_writes_json(tmp_path, color_folders, precompute):
    torch.manual_seed(0)
    weights = tmp_path / "encoder.pt"
    torch.save(resnet(18, stem="cifar").state_dict(), weights)  # a random-init encoder
    out = tmp_path / "linear.json"
    args = ["eval", "linear", str(weights), "--train", str(color_folders[0]), "--val", str(color_folders[1]),
            "--image-size", "16", "--batch-size", "10", "--epochs", "6", "--lr", "0.1", "--num-workers", "0",
            "--device", "cpu", "--out", str(out)] + (["--precompute"] if precompute else [])
    assert cli.main(args) == 0
    result = json.loads(out.read_text())
    assert result["protocol"] == "linear" and ("precomputed" in result["variant"]) == precompute
    assert result["num_classes"] == 3 and result["num_val"] == 18
    assert result["encoder"] == {"depth": 18, "width": 1, "stem": "cifar"}  # read back from the weights
    assert result["top1"] > 2 * 100 / 3 and result["top5"] == 100.0  # chance: 33%


def test_label_subset_is_balanced_and_reproducible(tmp_path):
    labels = [0] * 100 + [1] * 50 + [2] * 7
    paths = [f"/data/train/c{y}/{i:04d}.jpg" for i, y in enumerate(labels)]
    subset = label_subset(paths, labels, fraction=0.1, seed=0)
    counts = np.bincount([labels[i] for i in subset])
    assert counts.tolist() == [10, 5, 1]  # round(10%), at least one per class
    assert subset == label_subset(paths, labels, fraction=0.1, seed=0)
    assert subset != label_subset(paths, labels, fraction=0.1, seed=1)

    listing = tmp_path / "subset.txt"
    listing.write_text("# labeled images\nc0/0003.jpg\n0120.jpg\n\n")  # a relative path and a bare name
    assert label_subset(paths, labels, subset_file=listing, root="/data/train") == [3, 120]
    listing.write_text("c0/9999.jpg\n")
    with pytest.raises(ValueError, match="9999"):
        label_subset(paths, labels, subset_file=listing, root="/data/train")


def test_finetune_trains_the_encoder_end_to_end(color_folders):
    torch.manual_seed(0)
    encoder = resnet(18, stem="cifar")
    before = encoder.conv1.weight.detach().clone()
    data = EvalData.from_folders(*color_folders, image_size=12, batch_size=6, num_workers=0)
    subset = label_subset(data.train_paths, data.train_labels, fraction=0.2, seed=0)
    result = finetune(encoder, data, subset, epochs=1, lr=0.05)
    assert result["num_labeled"] == 6 and 0 <= result["top1"] <= result["top5"] <= 100
    assert not torch.equal(encoder.conv1.weight, before)  # gradients reached the encoder


# ---------------------------------------------------------------- the kNN monitor in the training loop


def tiny_run(root: Path, demo: dict, knn_every: int) -> Path:
    run_dir = root / f"run_knn{knn_every}"
    cfg = load_config(None, [
        f"data.path={demo['train']}", "data.batch_size=12", "data.num_workers=0", "model.depth=18",
        "model.stem=cifar", "model.channels_last=false", "augment.view1.crop_size=8", "augment.view2.crop_size=8",
        "byol.hidden_dim=16", "byol.proj_dim=8", "train.epochs=2", "train.device=cpu", "train.precision=fp32",
        f"train.run_dir={run_dir}", "logging.progress=none", "logging.plot=false", "logging.log_every=100",
        f"eval.knn_every={knn_every}", f"eval.train_path={demo['train']}", f"eval.val_path={demo['val']}",
        "eval.k=5", "eval.batch_size=16", "eval.num_workers=0",
    ])
    train(cfg)
    return run_dir


def test_knn_monitor_logs_every_epoch_and_leaves_training_unchanged(tmp_path):
    demo = make_demo_splits(tmp_path / "demo", num_classes=3, train_per_class=8, val_per_class=4, size=24)
    with_knn = tiny_run(tmp_path, demo, knn_every=1)
    records = [r for r in read_metrics(with_knn / "metrics.jsonl") if "knn_top1" in r]
    assert [r["step"] for r in records] == [2, 4]  # 24 images / batch 12: epoch ends at steps 2 and 4
    for r in records:
        assert 0 <= r["knn_top1"] <= r["knn_top5"] <= 100
    # the run ends with the untrained encoder's kNN next to the trained one's: the baseline must be
    # what `fastbyol eval knn RUN --random-init` computes on its own from the run's config
    end = [r for r in read_metrics(with_knn / "metrics.jsonl") if "knn_random_init_top1" in r]
    assert len(end) == 1 and end[0]["step"] == 4
    out = tmp_path / "random_init.json"
    assert cli.main(["eval", "knn", str(with_knn), "--random-init", "--k", "5", "--batch-size", "16",
                     "--num-workers", "0", "--out", str(out)]) == 0
    baseline = json.loads(out.read_text())
    assert (end[0]["knn_random_init_top1"], end[0]["knn_random_init_top5"]) == (baseline["top1"], baseline["top5"])
    # the last epoch not evaluated (every 3rd of 2): the end record still holds the final encoder's kNN,
    # the one `fastbyol eval knn RUN` computes from encoder.pt
    unevaluated = tiny_run(tmp_path, demo, knn_every=3)
    end = [r for r in read_metrics(unevaluated / "metrics.jsonl") if "knn_top1" in r]
    assert len(end) == 1 and end[0]["step"] == 4 and "knn_random_init_top1" in end[0]
    assert cli.main(["eval", "knn", str(unevaluated), "--k", "5", "--batch-size", "16", "--num-workers", "0",
                     "--out", str(out)]) == 0
    final = json.loads(out.read_text())
    assert (end[0]["knn_top1"], end[0]["knn_top5"]) == (final["top1"], final["top5"])
    # the evaluation runs the encoder in eval mode, on its own RNG: the run is the same without it
    without = tiny_run(tmp_path, demo, knn_every=0)
    a, b = torch.load(with_knn / "encoder.pt"), torch.load(without / "encoder.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
