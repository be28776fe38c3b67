"""`fastbyol VERB ...`: the command line. Each verb parses its arguments and calls one function."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

from fastbyol.config import ConfigError

err = Console(stderr=True, highlight=False)


def _train(args: argparse.Namespace) -> int:
    from fastbyol.config import load_config
    from fastbyol.dist import launcher_env
    from fastbyol.train import Interrupted, train

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"train.resume={'auto' if args.resume else 'never'}")
    cfg = load_config(args.config, overrides, world_size=launcher_env().world_size)
    try:
        summary = train(cfg, force=args.force)
    except Interrupted:
        return 130
    if launcher_env().is_main:
        err.print(f"done: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
                  f"{summary['mean_images_per_sec']:.1f} images/sec, {summary['wall_time_s']:.0f} s; "
                  f"run directory {summary['run_dir']}")
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastbyol", description="BYOL pretraining, as fast as the hardware allows.")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    _add_train(sub)
    _add_convert(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, NotADirectoryError) as e:
        err.print(f"[red]error:[/red] {e}")
        return 2
    except ImportError as e:  # an optional backend asked for and missing: the message says what to install
        err.print(f"[red]error:[/red] {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
