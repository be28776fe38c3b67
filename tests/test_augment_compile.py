"""benchmarks/augment_compile.py, the GPU suite's "does compiling the augmentation pay?" check,
run small on the CPU: gpu_augment.apply_params traces whole (fullgraph=True: a graph break is an
error) and the compiled view equals the eager one."""

from __future__ import annotations

import math

import torch

from benchmarks import augment_compile


def test_the_compiled_augmentation_is_the_eager_one(one_thread):
    result = augment_compile.measure(torch.device("cpu"), batch=4, size=16, repeats=2, warmup=1, backend="aot_eager")
    for view in ("view1", "view2"):
        r = result[view]
        assert r["max_abs_diff"] < 1e-5
        assert r["eager_ms"] > 0 and r["compiled_ms"] > 0 and math.isclose(r["speedup"], r["eager_ms"] / r["compiled_ms"])
