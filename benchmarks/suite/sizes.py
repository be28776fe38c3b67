"""What every stage sizes by: the GPU defaults, or TINY for a CPU smoke run of every stage (its
compiled stages through torch.compile's aot_eager backend: dynamo and AOT autograd for real, without
inductor's code generation, which takes minutes on a CPU)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    """Model, batch, timing windows and data sizes of one suite run."""

    depth: int = 50  # ResNet depth
    stem: str = "imagenet"
    size: int = 224  # view side, px
    batch: int = 256  # per-GPU batch of the headline figures
    sweep_batches: tuple[int, ...] = (16, 32, 64, 128, 256)  # step time against per-GPU batch
    hidden: int = 4096  # projector / predictor hidden width
    proj: int = 256
    steps: int = 10  # timed steps per window
    peer_steps: int = 8  # timed steps per contender per round in the peers stage (4 contenders)
    warmup: int = 3  # untimed steps first (cuDNN picks its algorithms in the first)
    rounds: int = 3  # windows per figure; the median is reported
    compile_backend: str = "inductor"  # model.compile_backend of the compiled stages
    images: int = 3000  # photo-like JPEGs written for the loader stages
    image_hw: tuple[int, int] = (400, 500)
    max_res: int = 256  # fastbyol convert --max-res
    workers: int = 16  # loader workers (the node's CPU count)
    loader_steps: int = 10  # fastbyol profile --steps per figure (3,000 images: 11 steps an epoch)
    fused_repeats: int = 50  # LARS / EMA calls timed per variant


TINY = Sizes(depth=18, stem="cifar", size=16, batch=4, sweep_batches=(2, 4), hidden=32, proj=16, steps=2,
             peer_steps=2, warmup=1, rounds=1, compile_backend="aot_eager", images=16, image_hw=(40, 48), max_res=32,
             workers=1, loader_steps=2, fused_repeats=2)

BYOL_COST = 8 / 3  # a BYOL image: 2 views x (online fwd+bwd + target fwd) ~ 8/3 of a supervised image
