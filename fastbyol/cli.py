"""`fastbyol VERB ...`: the command line. Each verb parses its arguments and calls one function."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from fastbyol.config import ConfigError

err = Console(stderr=True, highlight=False, soft_wrap=True)


def _train(args: argparse.Namespace) -> int:
    from fastbyol.atomic import NO_SPACE, NoSpaceLeft, file_system
    from fastbyol.config import load_config
    from fastbyol.dist import RankLost, launcher_env
    from fastbyol.train import Diverged, Interrupted, summary_lines, train

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"train.resume={'auto' if args.resume else 'never'}")
    cfg = load_config(args.config, overrides, world_size=launcher_env().world_size)
    try:
        summary = train(cfg, force=args.force)
    except Interrupted:
        return 130
    except KeyboardInterrupt as e:  # a second Ctrl-C: out now, still an interrupt, without a traceback
        print_error(f"{str(e) or 'interrupted again'}; {_newest_checkpoint(cfg.train.run_dir)}")
        return 130
    except OSError as e:
        if not isinstance(e, NoSpaceLeft) and e.errno not in NO_SPACE:
            raise
        what = str(e) if isinstance(e, NoSpaceLeft) else f"no space left on {file_system(cfg.train.run_dir)} ({e})"
        print_error(f"{what}; {_newest_checkpoint(cfg.train.run_dir)}")
        return 1
    except RankLost as e:
        print_error(e)
        return 1
    except Diverged as e:
        print_error(e)
        return 3
    if launcher_env().is_main:
        for line in summary_lines(summary):
            err.print(line, markup=False, highlight=False, soft_wrap=True)
    return 0


def _newest_checkpoint(run_dir: str) -> str:
    """What a run that stopped mid-write still has: every file is written atomically, so the newest
    checkpoint on disk is whole."""
    from fastbyol.checkpoint import list_checkpoints

    found = list_checkpoints(run_dir)
    return f"the newest whole checkpoint is {found[-1]}" if found else f"{run_dir} holds no checkpoint yet"


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="pretrain an encoder with BYOL from a YAML config",
                       description="Pretrain with BYOL. Overrides after the config: key=value, e.g. train.epochs=10")
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="a.b.c=value overrides of config keys")
    p.add_argument("--resume", dest="resume", action="store_true", default=None,
                   help="continue from the newest checkpoint of train.run_dir (the default: train.resume=auto)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="start from scratch (train.resume=never)")
    p.add_argument("--force", action="store_true", help="use train.run_dir even if it holds a different config")
    p.set_defaults(func=_train)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    try:
        from pipelines.convert import add_convert_arguments, run_convert
    except ImportError:  # the converter's module is not part of this installation
        return
    p = sub.add_parser("convert", help="write an ImageNet / ImageFolder tree as an FFCV .beton file")
    add_convert_arguments(p)
    p.set_defaults(func=run_convert)


def _add_profile(sub: argparse._SubParsersAction) -> None:
    from fastbyol.profile import add_profile_arguments, run_profile

    p = sub.add_parser("profile", help="loader-only, model-only and end-to-end images/sec of a config")
    add_profile_arguments(p)
    p.set_defaults(func=run_profile)


def _eval(args: argparse.Namespace) -> int:
    import torch

    from fastbyol.dist import resolve_device
    from fastbyol.export import load_encoder
    from fastbyol.finetune import finetune
    from fastbyol.knn import RawPixels, knn_eval
    from fastbyol.linear import linear_eval
    from fastbyol.results import default_result_path
    from pipelines.labelled import EvalData, label_subset

    raw_pixels = getattr(args, "raw_pixels", False)
    if args.source is None and not raw_pixels:
        raise ConfigError(f"eval {args.protocol}: give the encoder to evaluate (a run directory, checkpoint_*.pt "
                          f"or encoder.pt)")
    loaded = None if args.source is None else load_encoder(args.source, args.depth, args.width, args.stem,
                                                           random_init=args.random_init)
    train = args.train or (loaded.train_path if loaded else "")
    val = args.val or (loaded.val_path if loaded else "")
    if not (train and val):
        raise ConfigError("eval: give the labeled folders with --train DIR --val DIR "
                          "(a run directory whose config sets eval.train_path and eval.val_path supplies them)")
    image_size = args.image_size or (loaded.image_size if loaded else 0)
    if not image_size:
        raise ConfigError("eval knn --raw-pixels: give --image-size N (or a run directory, whose crop size is used)")
    norm = {"mean": loaded.mean, "std": loaded.std} if loaded else {}
    data = EvalData.from_folders(train, val, image_size, **norm, batch_size=args.batch_size,
                                 num_workers=args.num_workers, channels_last=args.channels_last)
    if raw_pixels:  # the baseline without an encoder: the same views and vote on the pixels themselves
        result = knn_eval(RawPixels(image_size), data, args.k, args.temperature)
        result.update(source="raw pixels", train=str(train), val=str(val), encoder=None)
        return _report(result, args.out or (default_result_path(args.source, "knn_raw_pixels") if args.source
                                            else Path(f"eval_knn_raw_pixels_{image_size}px.json")))
    encoder = loaded.encoder.to(resolve_device(args.device))
    if args.channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
    if args.protocol == "knn":
        result, name = knn_eval(encoder, data, args.k, args.temperature), "knn"
    elif args.protocol == "linear":
        result = linear_eval(encoder, data, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                             precompute=args.precompute, seed=args.seed, log=err.print)
        name = "linear_precomputed" if args.precompute else "linear"
    else:
        subset = label_subset(data.train_paths, data.train_labels, fraction=args.label_fraction,
                              subset_file=args.subset, root=train, seed=args.seed)
        result = finetune(encoder, data, subset, epochs=args.epochs, lr=args.lr,
                          weight_decay=args.weight_decay, seed=args.seed, log=err.print)
        name = f"finetune_{args.label_fraction * 100:g}pct" if args.subset is None else f"finetune_{args.subset.stem}"
    if args.random_init:
        name += "_random_init"
    result.update(source=loaded.source, train=str(train), val=str(val),
                  encoder={"depth": loaded.depth, "width": loaded.width, "stem": loaded.stem})
    return _report(result, args.out or default_result_path(args.source, name))


def _report(result: dict, out: Path) -> int:
    """Write an evaluation's result JSON to `out`, print its one-line summary and the path."""
    from fastbyol.results import write_result

    path = write_result(result, out)
    variant = f" ({result['variant']})" if "variant" in result else ""
    err.print(f"{result['protocol']}{variant}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
              f"({result['num_val']} val images, {result['num_classes']} classes, {result['time_s']:.0f} s)")
    print(path)
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    from fastbyol.config import EvalConfig
    from fastbyol.models.resnet import STEMS

    defaults = EvalConfig()  # the eval section of a training config: one set of defaults for both
    p = sub.add_parser("eval", help="kNN, linear or fine-tuning evaluation of a pretrained encoder")
    protocols = p.add_subparsers(dest="protocol", required=True, metavar="PROTOCOL")
    helps = {"knn": "weighted kNN (cosine, exp(sim/T) votes) on frozen features",
             "linear": "the paper's linear evaluation: frozen encoder, linear classifier, SGD Nesterov, cosine lr",
             "finetune": "the paper's semi-supervised protocol: fine-tune encoder + linear head on 1%% / 10%% of labels"}
    for name, text in helps.items():
        q = protocols.add_parser(name, help=text, description=text)
        q.add_argument("source", nargs="?" if name == "knn" else None,
                       help="run directory, checkpoint_*.pt or encoder.pt" + (" (optional with --raw-pixels)"
                                                                              if name == "knn" else ""))
        q.add_argument("--train", help="labeled ImageFolder to train on / the kNN bank (default: the run's eval.train_path)")
        q.add_argument("--val", help="labeled ImageFolder to test on (default: the run's eval.val_path)")
        q.add_argument("--image-size", type=int, default=0, help="test crop size (default: the run's, else 224)")
        q.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per batch")
        q.add_argument("--num-workers", type=int, default=defaults.num_workers, help="image decoding workers")
        q.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
        q.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster on GPUs)")
        q.add_argument("--depth", type=int, help="ResNet depth (default: the run's, else read from the weights)")
        q.add_argument("--width", type=int, help="width multiplier (default: the run's, else read from the weights)")
        q.add_argument("--stem", choices=STEMS, help="stem (default: the run's, else from the weights)")
        q.add_argument("--random-init", action="store_true",
                       help="ignore the weights: the same encoder as initialised by the run's seed (the baseline)")
        q.add_argument("--out", type=Path, help="result JSON (default: RUN_DIR/eval_<protocol>.json)")
        q.set_defaults(func=_eval)
        if name == "knn":
            q.add_argument("--k", type=int, default=defaults.k, help="neighbours per vote")
            q.add_argument("--temperature", type=float, default=defaults.temperature,
                           help="vote weight exp(cosine / temperature)")
            q.add_argument("--raw-pixels", action="store_true",
                           help="the baseline without an encoder: kNN on the test views' normalized pixels "
                                "(a SOURCE run directory gives the folders, size and normalization)")
            continue
        q.add_argument("--epochs", type=int, default=80 if name == "linear" else 30)
        q.add_argument("--lr", type=float, help="peak lr, cosine-decayed to 0 (default: "
                       + ("0.2" if name == "linear" else "0.05") + " * batch / 256)")
        q.add_argument("--weight-decay", type=float, default=0.0)
        q.add_argument("--seed", type=int, default=0, help="order, crops and (finetune) the label subset")
        if name == "linear":
            q.add_argument("--precompute", action="store_true",
                           help="fast variant: encode the images once without augmentation, train on cached features")
        else:
            which = q.add_mutually_exclusive_group(required=True)
            which.add_argument("--label-fraction", type=float, help="labeled share per class, e.g. 0.01 or 0.1")
            which.add_argument("--subset", type=Path, help="file listing the labeled images (relative paths or names)")


def _export(args: argparse.Namespace) -> int:
    from fastbyol.export import export_encoder

    info = export_encoder(args.source, args.out)
    err.print(f"wrote {info['path']}: ResNet-{info['depth']} {info['width']}x {info['stem']} stem, "
              f"{info['num_params'] / 1e6:.1f}M parameters, from {info['source']}")
    err.print(info["note"])
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write the online encoder as a torchvision-style ResNet state_dict")
    p.add_argument("source", help="run directory (its newest checkpoint, else encoder.pt), checkpoint_*.pt or encoder.pt")
    p.add_argument("out", help="output file, e.g. encoder.pt (written atomically)")
    p.set_defaults(func=_export)


def _views(args: argparse.Namespace) -> int:
    from fastbyol.views import write_views

    path = write_views(args.config, list(args.overrides), args.out, args.count)
    err.print(f"wrote {path}: source images beside their two views, as the configured backend made them",
              markup=False, highlight=False)
    return 0


def _add_views(sub: argparse._SubParsersAction) -> None:
    from fastbyol.views import add_views_arguments

    p = sub.add_parser("views", help="write views.png: source images beside the two views the data pipeline makes",
                       description="The picture `fastbyol train` writes into the run directory (epoch 0's first "
                                   "batch), without training.")
    add_views_arguments(p)
    p.set_defaults(func=_views)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastbyol", description="BYOL pretraining, as fast as the hardware allows.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    _add_train(sub)
    _add_convert(sub)
    _add_profile(sub)
    _add_eval(sub)
    _add_export(sub)
    _add_views(sub)
    return parser


def error_line(e: BaseException) -> str:
    """The one line a user needs from a bad-input exception. An exception re-raised from a
    DataLoader worker carries the worker's traceback in its message: its last line is the error."""
    text = str(e).strip() or type(e).__name__
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split())


def print_error(e: BaseException) -> None:
    # the message is data, not markup: "[...]" in it (a path, a list) is printed as written
    err.print(f"[red]error:[/red] {escape(error_line(e))}")


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 a rank was lost (named in one line), 2 bad input (named in one line),
    3 the run diverged (the step and the checkpoint kept named in one line), 130 interrupted (a
    second Ctrl-C too); a full disk while training is 1, with the newest whole checkpoint named."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    # Bad input (ConfigError is a ValueError; missing, unreadable or corrupt files) and missing
    # optional backends: their messages name the key, the path or the package to install, so a
    # traceback adds nothing.
    except (ValueError, OSError, ImportError) as e:
        print_error(e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
