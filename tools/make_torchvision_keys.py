"""Write torchvision's ResNet state_dict keys and shapes, the independent truth for tests/test_resnet.py.

Run once, in a throwaway environment that has torchvision (the project itself never needs it):

    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch torchvision
    /tmp/tv/bin/python tools/make_torchvision_keys.py tests/data

For each depth it writes torchvision_resnet{N}_keys.txt: one `key [d0, d1, ...]` line per entry
of `torchvision.models.resnetN().state_dict()` in order, buffers included (running_mean,
running_var, num_batches_tracked, whose shape is `[]`). The classifier (fc.weight, fc.bias) is
dropped, because the fastbyol encoder has no fc layer; a `#` header line records what was dropped
and which versions wrote the file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEPTHS = (18, 34, 50, 101, 152)


def key_lines(depth: int) -> tuple[list[str], list[str]]:
    """(`key [shape]` lines of the encoder, dropped fc keys) of torchvision's resnet{depth}()."""
    import torch
    import torchvision

    with torch.device("meta"):  # shapes only, no allocation
        model = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    kept, dropped = [], []
    for key, value in model.state_dict().items():
        if key.startswith("fc."):
            dropped.append(key)
        else:
            kept.append(f"{key} {list(value.shape)}")
    return kept, dropped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder for torchvision_resnet{N}_keys.txt")
    args = parser.parse_args()
    import torch
    import torchvision

    args.out_dir.mkdir(parents=True, exist_ok=True)
    for depth in DEPTHS:
        kept, dropped = key_lines(depth)
        header = (f"# torchvision {torchvision.__version__} (torch {torch.__version__}) resnet{depth}()"
                  f".state_dict(); dropped (no classifier in the encoder): {', '.join(dropped)}")
        path = args.out_dir / f"torchvision_resnet{depth}_keys.txt"
        path.write_text("\n".join([header, *kept]) + "\n")
        print(f"{path}: {len(kept)} keys")


if __name__ == "__main__":
    main()
