"""Throughput profiler for cluster scripts: the same code as `fastbyol profile`.

    python tools/profile_throughput.py configs/imagenet_r50_dali.yaml --steps 100 --json prof.json
    torchrun --nproc-per-node 8 tools/profile_throughput.py configs/imagenet_r50_ffcv.yaml data.path=...
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without `pip install`

from fastbyol.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["profile", *sys.argv[1:]]))
