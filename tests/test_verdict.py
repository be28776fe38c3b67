"""The verdict rules (fastbyol/verdict.py) on recorded figures: each case is a verdict worked out by
hand from the rules in the docstring, at and around every threshold."""

from __future__ import annotations

import pytest

from fastbyol.verdict import VERDICTS, verdict

# Recorded figures (loader-only, model-only, end-to-end images/sec) and the verdict they must get.
VERDICT_CASES = [
    # a 2-core CPU, quickstart: the loader is 25x faster than the step, yet end-to-end loses 8 %:
    # its workers take the cores the CPU step runs on (this was once called "balanced")
    ((63.0, 2.5, 2.3), "contention"),
    ((493.0, 9.4, 8.9), "contention"),  # gpu_suite --tiny, folder backend, 1 worker, on the same CPU
    ((300, 100, 80), "contention"),  # ample headroom but a costly pipeline: copies or syncs
    ((300, 100, 96.9), "contention"),  # just under the hiding goal
    ((50, 100, 49), "loader-bound"),  # the loader alone is slower than the step
    ((110, 100, 85), "loader-bound"),  # costly pipeline, under 20 % headroom
    ((99.9, 100, 99.9), "loader-bound"),
    ((300, 100, 98), "model-bound"),
    ((120, 100, 97), "model-bound"),  # both thresholds inclusive
    ((1353.0, 10.0, 11.8), "model-bound"),  # gpu_suite --tiny, ffcv: end-to-end above model-only is noise
    ((110, 100, 95), "balanced"),  # just keeps up, small loss
    ((119, 100, 90), "balanced"),
]


@pytest.mark.parametrize("figures,expected", VERDICT_CASES)
def test_verdict_rules_on_recorded_figures(figures, expected):
    word, evidence = verdict(*figures)
    assert word == expected, (figures, evidence)
    loader, model, e2e = figures
    assert any(f"{loader / model:.2f}" in line for line in evidence)
    assert any(f"{e2e / model:.2f}" in line for line in evidence)


def test_contention_names_the_shared_resource():
    word, evidence = verdict(63.0, 2.5, 2.3)
    assert word == "contention"
    assert "25.2x faster" in evidence[-1] and "loses 8 %" in evidence[-1]
    assert "CPU cores" in evidence[-1] and "copy" in evidence[-1]


def test_the_recorded_cases_reach_every_verdict():
    assert {expected for _, expected in VERDICT_CASES} == set(VERDICTS)
