"""fastbyol.timing and fastbyol.machine: what is timed, how often a step runs, what the figure means.

The clock is the real one. Each step records when it ran, and a window's seconds are bracketed
from those records (it cannot be shorter than its own calls, nor longer than the gap between its
neighbours), so every assertion holds however loaded the machine is.
"""

from __future__ import annotations

import statistics
import time

import torch

from fastbyol import timing
from fastbyol.machine import MACHINE_KEYS, machine_info

CPU = torch.device("cpu")
NAP = 0.02  # seconds each recorded call sleeps


def _recorded(spans: list[tuple[float, float]]):
    def step() -> None:
        start = time.perf_counter()
        time.sleep(NAP)
        spans.append((start, time.perf_counter()))
    return step


def test_images_per_sec_is_the_median_of_images_over_each_windows_seconds():
    spans: list[tuple[float, float]] = []
    warmup, calls, rounds, images = 2, 3, 4, 8
    t0 = time.perf_counter()
    rate = timing.images_per_sec(_recorded(spans), images, calls, CPU, warmup=warmup, rounds=rounds)
    t1 = time.perf_counter()
    assert len(spans) == warmup + rounds * calls
    fastest, slowest = [], []
    for k in range(rounds):
        first, last = warmup + k * calls, warmup + k * calls + calls - 1
        shortest = spans[last][1] - spans[first][0]  # its own calls
        after = spans[last + 1][0] if last + 1 < len(spans) else t1
        longest = after - spans[first - 1][1]  # from the call before to the call after
        fastest.append(calls * images / shortest)
        slowest.append(calls * images / longest)
    assert statistics.median(slowest) <= rate <= statistics.median(fastest)


def test_time_window_times_exactly_its_calls():
    spans: list[tuple[float, float]] = []
    t0 = time.perf_counter()
    seconds = timing.time_window(_recorded(spans), 5, CPU)
    t1 = time.perf_counter()
    assert len(spans) == 5
    assert spans[-1][1] - spans[0][0] <= seconds <= t1 - t0


def test_interleaved_alternates_steps_after_each_ones_warmup():
    order: list[str] = []
    steps = {name: (lambda name=name: order.append(name)) for name in ("a", "b", "c")}
    seconds = timing.interleaved(steps, calls=2, device=CPU, warmup=1, rounds=3)
    assert order == ["a", "b", "c"] + ["a", "a", "b", "b", "c", "c"] * 3
    assert {name: len(s) for name, s in seconds.items()} == {"a": 3, "b": 3, "c": 3}


def test_part_timer_parts_lie_inside_the_whole():
    timer = timing.PartTimer(CPU)
    nap = timer.wrap("nap", time.sleep)
    t0 = time.perf_counter()
    for _ in range(3):
        with timer.part("step"):
            nap(NAP)
            time.sleep(NAP)
    t1 = time.perf_counter()
    assert 3 * NAP <= timer.seconds("nap")
    assert timer.seconds("nap") + 3 * NAP <= timer.seconds("step") <= t1 - t0
    assert timer.seconds("never") == 0


def test_machine_info_keys_and_versions():
    info = machine_info(CPU, packages=("torch", "surely-not-installed-xyz"))
    assert tuple(info) == MACHINE_KEYS
    assert info["gpu"] == "cpu" and info["gpu_memory_bytes"] is None and info["cudnn"] is None
    assert info["torch"] == torch.__version__
    assert info["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert info["packages"]["surely-not-installed-xyz"] is None
