"""Fixtures shared by several test modules."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Callable

import pytest
import torch

DATA = Path(__file__).parent / "data"

# The optional backends: a test marked with one skips, saying how to install it, where it is missing.
# Only a missing package skips; an installed one that fails to import fails its tests.
OPTIONAL_BACKENDS = {
    "ffcv": ("ffcv", "FFCV 1.0.2 is not installed (bash tools/install_ffcv.sh)"),
    "dali": ("nvidia.dali", "NVIDIA DALI is not installed (pip install -e '.[dali]')"),
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package (nvidia) is missing
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for marker, (module, reason) in OPTIONAL_BACKENDS.items():
        if _installed(module):
            continue
        for item in items:
            if item.get_closest_marker(marker):
                item.add_marker(pytest.mark.skip(reason=reason))


def _single_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """Tiny models: intra-op threads only add contention (10x slower on a loaded 2-core machine)."""
    yield from _single_torch_thread()


@pytest.fixture(scope="module")
def one_thread_module():
    """one_thread for a whole module (`pytestmark = pytest.mark.usefixtures("one_thread_module")`)."""
    yield from _single_torch_thread()


def _torchvision_keys(depth: int) -> dict[str, list[int]]:
    out = {}
    for line in (DATA / f"torchvision_resnet{depth}_keys.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split(" ", 1)
            out[key] = json.loads(shape)
    return out


@pytest.fixture
def torchvision_keys() -> Callable[[int], dict[str, list[int]]]:
    """depth -> torchvision's resnetN().state_dict() keys and shapes, fc dropped (tools/make_torchvision_keys.py)."""
    return _torchvision_keys
