"""Timing a step callable: seconds per window and images/sec, with the device synchronised.

The one way every measurement here times work: the profiler (fastbyol profile), and benchmarks/
peers.py, fused_ops.py and gpu_suite.py. A window starts once every kernel already queued on the
device has finished and ends once every kernel it queued has finished, on the host clock
(time.perf_counter): CUDA kernels run asynchronously, so without the syncs a window would time the
queueing, not the work. On a CPU kernels are synchronous and the syncs cost nothing. Warm-up calls
(cudnn autotune, compilation, allocator growth, lazy initialisation) are never timed.

Inside a step, `PartTimer` times named parts (e.g. the optimizer's share) with CUDA events, which
time the GPU's own work between two points of the stream without a sync in the middle of the step.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from typing import Any, Callable, Iterator, Mapping

import torch


def synchronize(device: torch.device) -> None:
    """Wait until every kernel queued on `device` has finished (nothing to wait for on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    """Seconds on the host clock once every kernel queued on `device` has finished."""
    synchronize(device)
    return time.perf_counter()


def time_window(step: Callable[[], Any], calls: int, device: torch.device) -> float:
    """Seconds for `calls` calls of `step`, the device synchronised before and after."""
    start = now(device)
    for _ in range(calls):
        step()
    return now(device) - start


def images_per_sec(step: Callable[[], Any], images_per_call: int, calls: int, device: torch.device,
                   warmup: int = 0, rounds: int = 1) -> float:
    """Images/sec of `step`: `warmup` untimed calls, then the median over `rounds` windows of `calls`
    calls (inf for a window too short for the clock)."""
    for _ in range(warmup):
        step()
    rates = []
    for _ in range(rounds):
        seconds = time_window(step, calls, device)
        rates.append(calls * images_per_call / seconds if seconds > 0 else math.inf)
    return statistics.median(rates)


def interleaved(steps: Mapping[str, Callable[[], Any]], calls: int, device: torch.device,
                warmup: int = 0, rounds: int = 1) -> dict[str, list[float]]:
    """Seconds of each of `rounds` windows of `calls` calls, per named step. The steps take turns
    within each round (a, b, c, a, b, c, ...), so a drift of clock, temperature or machine load
    hits them alike; each gets `warmup` untimed calls first."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            seconds[name].append(time_window(step, calls, device))
    return seconds


class PartTimer:
    """Accumulated seconds per named part of a step: CUDA events on a GPU, perf_counter on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.spans: dict[str, list] = {}

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Time the body of the `with` as one span of `name`."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.spans.setdefault(name, []).append((start, end))
        else:
            start = time.perf_counter()
            yield
            self.spans.setdefault(name, []).append(time.perf_counter() - start)

    def wrap(self, name: str, fn: Callable) -> Callable:
        """`fn` with each call timed as a span of `name`."""
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.part(name):
                return fn(*args, **kwargs)
        return timed

    def seconds(self, name: str) -> float:
        """Total seconds of the spans of `name` (0 when none)."""
        spans = self.spans.get(name, [])
        if self.cuda:
            torch.cuda.synchronize()
            return sum(s.elapsed_time(e) for s, e in spans) / 1000.0
        return sum(spans)


__all__ = ["PartTimer", "images_per_sec", "interleaved", "now", "synchronize", "time_window"]
