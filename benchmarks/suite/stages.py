"""The stage table: which run measures what, in which order, within what time.

Two runs, each one device command that fits one session with its machine start (benchmarks/README.md
has the plan): A brings the figures the project is judged by, B what needs DALI's 246 MiB brought
over several commands first, then the compiled variants with what time is left. In each run the
most telling figure comes first, and every stage saves each figure the moment it is measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from benchmarks.suite import augment, ceiling, environment, fused, loaders, model
from benchmarks.suite.context import Context


@dataclass(frozen=True)
class Stage:
    name: str
    run: str  # "A" or "B"
    budget_s: float  # the stage's process is killed after this many seconds (GPU sizes)
    measure: Callable[[Context], dict[str, Any]]
    what: str  # one line for the README's table


STAGES = (
    Stage("environment", "A", 20, environment.environment, "GPU, driver, versions, optional imports"),
    Stage("ceiling", "A", 35, ceiling.ceiling, "supervised ResNet-50 step, eager: the BYOL bar is 3/8 of it"),
    Stage("model", "A", 50, model.model, "fastbyol model-only, eager and concat_views, peak memory, host syncs"),
    Stage("peers", "A", 60, model.peer_step, "fastbyol, fastbyol-concat, lightly, byol-pytorch, alternated"),
    Stage("sweep", "A", 65, model.sweep, "step time against per-GPU batch 16 ... 256 (step_time_vs_batch.jsonl)"),
    Stage("fused", "A", 20, fused.fused, "LARS + EMA share of the eager step; one LARS step's ops and kernels"),
    Stage("loader", "A", 90, loaders.loader, "folder and ffcv: loader, model-only, end to end, verdict"),
    Stage("dali", "B", 60, loaders.dali, "the DALI backend, the same three figures"),
    Stage("compile", "B", 90, model.compiled, "model.compile: compile seconds, then images/sec"),
    Stage("augment", "B", 60, augment.augment, "one view's augmentation, eager vs torch.compile, per policy"),
    Stage("cudagraphs", "B", 90, model.cudagraphs, "model.compile_mode=reduce-overhead (CUDA graphs)"),
    Stage("ceiling_compiled", "B", 60, ceiling.ceiling_compiled, "the supervised step through torch.compile"),
    Stage("ddp", "B", 45, model.ddp, "the step in DDP over one rank, +- gradient_as_bucket_view"),
)
BY_NAME = {s.name: s for s in STAGES}
RUNS = {run: tuple(s.name for s in STAGES if s.run == run) for run in ("A", "B")}
# Each run's deadline, install included (seconds); benchmarks/README.md's plan fits both, with their
# machine start and DALI's transfers, in 13 of a session's 15 device minutes.
TOTAL_S = {"A": 330, "B": 160}
