#!/usr/bin/env python
"""Convert an ImageNet root (train/ and val/) to two .beton files, val with train's class map.

    python tools/convert_imagenet.py /data/imagenet /data/betons
    -> /data/betons/imagenet_train.beton (+ .classes.json), /data/betons/imagenet_val.beton

ROOT/train holds one folder per synset; ROOT/val holds either synset folders or the flat
images with LOC_val_solution.csv in ROOT or above (the Kaggle layout), or pass --val-labels.
The same functions as `fastbyol convert`; options as there (--help).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.convert import add_writer_arguments, convert, writer_options  # noqa: E402
from pipelines.sources import class_map_path  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="ImageNet root with train/ and val/")
    parser.add_argument("out_dir", type=Path, help="folder for the .beton files")
    parser.add_argument("--prefix", default="imagenet", help="file name prefix (default imagenet)")
    parser.add_argument("--splits", default="train,val", help="which splits, comma-separated")
    parser.add_argument("--val-labels", default=None, help="label CSV of a flat val/ folder")
    add_writer_arguments(parser)
    args = parser.parse_args(argv)
    splits = [s for s in args.splits.split(",") if s]
    unknown = set(splits) - {"train", "val"}
    if unknown:
        parser.error(f"--splits {args.splits}: expected train and/or val")
    options = writer_options(args)
    train_out = args.out_dir / f"{args.prefix}_train.beton"
    try:
        for split in splits:
            out = args.out_dir / f"{args.prefix}_{split}.beton"
            class_map = None
            if split == "val":
                class_map = class_map_path(train_out)
                if not class_map.is_file():
                    parser.error(f"{class_map}: missing; convert train first (val uses its class map)")
            summary = convert(args.root / split, out, class_map=class_map,
                              val_labels=args.val_labels if split == "val" else None, **options)
            print(summary.report())
    except KeyboardInterrupt:
        print("interrupted: the split being written was not written", file=sys.stderr)
        return 130
    except (OSError, ValueError, ImportError, RuntimeError) as err:
        print(f"convert_imagenet: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
