"""Per-run throughput figures: model FLOPs against an independent count, peaks, the time window."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from fastbyol.config import load_config
from fastbyol.metrics import MetricWindow, time_figures
from fastbyol.step import build_model
from fastbyol.train import summary_lines
from fastbyol.utilization import mfu, peak_flops, step_flops_per_image

TINY = ["data.backend=synthetic", "model.depth=18", "model.stem=cifar", "byol.hidden_dim=64", "byol.proj_dim=32",
        "augment.view1.crop_size=16", "augment.view2.crop_size=16"]


def _macs(module: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(multiply-adds of every Conv2d and Linear in one forward of x, those of the first conv),
    from the layers' shapes: output elements × inputs per output."""
    macs: list[int] = []

    def count(m: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        if isinstance(m, nn.Conv2d):
            macs.append(out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1])
        elif isinstance(m, nn.Linear):
            macs.append(out.numel() * m.in_features)

    hooks = [m.register_forward_hook(count) for m in module.modules()]
    with torch.no_grad():
        module(x)
    for h in hooks:
        h.remove()
    return sum(macs), macs[0]


def test_step_flops_match_a_count_from_the_layer_shapes():
    cfg = load_config(None, TINY)
    model = build_model(cfg).train()
    x = torch.randn(2, 3, 16, 16)
    online = nn.Sequential(model.online_encoder, model.online_projector, model.predictor)
    online_macs, first_conv = _macs(online, x)
    target_macs, _ = _macs(nn.Sequential(model.online_encoder, model.online_projector), x)
    # per view: online forward, its backward (weight gradients everywhere, input gradients except
    # at the first conv, whose input is the image), target forward; 2 FLOPs per multiply-add
    per_view = 2 * (online_macs + 2 * online_macs - first_conv + target_macs)
    assert step_flops_per_image(cfg, build_model) == pytest.approx(2 * per_view / 2, rel=1e-9)


def test_counting_flops_leaves_the_global_rng_alone():
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    step_flops_per_image(load_config(None, TINY), build_model)
    assert torch.equal(torch.rand(3), expected)


def test_peaks_of_known_gpus_and_unknown_elsewhere(monkeypatch):
    assert peak_flops(torch.device("cpu"), "bf16") is None
    names = iter(["NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB", "Tesla T4"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: next(names))
    cuda = torch.device("cuda", 0)
    assert peak_flops(cuda, "bf16") == pytest.approx(989.4e12)
    assert peak_flops(cuda, "fp16") == pytest.approx(756e12)
    assert peak_flops(cuda, "fp32") == pytest.approx(156e12)  # TF32, torch's default for cuDNN convolutions
    assert peak_flops(cuda, "bf16") is None
    assert mfu(1e9, 100.0, 1e12) == pytest.approx(0.1) and mfu(1e9, 100.0, None) is None


class MovedClock:
    """A clock that moves only when the test moves it: the window's split of time is then exact."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_window_splits_wall_time_into_loader_wait_and_the_rest():
    clock = MovedClock()
    window = MetricWindow(torch.device("cpu"), images_per_step=8, flops_per_image=1e9, peak_flops=2e11,
                          first_step=10, clock=clock)
    loads, steps = [0.25, 0.0, 1.5, 0.125], [0.5, 0.75, 0.25, 1.0]  # seconds, exact in binary

    def loader():
        for load in loads:
            clock.now += load  # the time the loop waits for this batch
            yield load

    for i, _ in enumerate(window.batches(loader())):
        clock.now += steps[i]  # the step, logging, checkpoints: everything but the wait
        window.add(torch.tensor(1.0 + i), torch.tensor(0.5), torch.tensor(2.0 * i))
    r = window.flush(14)
    wait, wall = sum(loads), sum(loads) + sum(steps)
    assert r["loader_wait_share"] == pytest.approx(wait / wall, rel=1e-12)
    assert r["step_time_s"] == pytest.approx(wall / 4, rel=1e-12)
    assert r["images_per_sec"] == pytest.approx(4 * 8 / wall, rel=1e-12)  # 32 images since the window began
    assert r["mfu"] == pytest.approx(1e9 * 32 / wall / 2e11, rel=1e-12)
    assert (r["loss"], r["cosine"], r["collapse_std"]) == (2.5, 0.5, 3.0)  # means over the 4 steps
    assert window.total == {"images": 32, "wall_s": wall, "wait_s": wait}
    assert time_figures(r) == "wait 43%  step 1.09 s  MFU 3.7%"  # 1.875 / 4.375 s; 4.375 / 4; 32e9 / 4.375 / 2e11
    # an evaluation after the flush (window.pause) is left out of the next window
    clock.now += 60.0
    window.pause(14)
    clock.now += 0.5
    window.add(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0))
    later = window.flush(15)
    assert later["step_time_s"] == pytest.approx(0.5) and later["images_per_sec"] == pytest.approx(8 / 0.5)
    assert later["loader_wait_share"] == 0.0


def test_summary_prints_the_figures_and_the_verdict():
    summary = {"steps": 3, "final_loss": 1.5, "mean_images_per_sec": 10.0, "wall_time_s": 2.0, "run_dir": "r",
               "loader_wait_share": 0.6, "step_time_s": 0.2, "mfu": 0.25, "verdict": "loader-bound",
               "verdict_reason": "the loader alone delivers less"}
    done, figures, verdict = summary_lines(summary)
    assert done.startswith("done: 3 steps") and figures == "time: wait 60%  step 0.2 s  MFU 25.0%"
    assert verdict == "verdict: loader-bound (the loader alone delivers less)"
