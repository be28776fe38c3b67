"""The flat-buffer EMA of the fused-ops benchmark: the EMA formula, live views, aligned offsets."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from benchmarks import fused_ops
from benchmarks.fused_ops import FlatEMA
from fastbyol.ema import TargetEMA
from fastbyol.optim import LARS
from test_ema import make_pair


def test_flat_update_is_the_ema_formula_and_copies_counters() -> None:
    online, target = make_pair()
    running = {n: b.clone() for n, b in target.named_buffers() if b.is_floating_point()}
    ema = FlatEMA(TargetEMA(online, target))
    theta = [p.detach().clone() for p in online.parameters()]
    xi = [p.detach().clone() for p in target.parameters()]
    ema.update(0.9)
    for new, t, x in zip(target.parameters(), theta, xi):
        torch.testing.assert_close(new.detach(), 0.9 * x + 0.1 * t, atol=1e-6, rtol=0)
    for name, b in target.named_buffers():
        if b.is_floating_point():
            assert torch.equal(b, running[name])
        else:
            assert torch.equal(b, dict(online.named_buffers())[name])


def test_flat_views_stay_live_under_the_optimizer() -> None:
    online, target = make_pair()
    online = online.to(memory_format=torch.channels_last)
    ema = FlatEMA(TargetEMA(online, target))
    conv = online[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last), "flattening keeps the memory format"
    assert target[0].weight.stride() == conv.stride(), "target takes the online layout"
    for p in online.parameters():
        assert p.untyped_storage().data_ptr() == ema.online_flat.untyped_storage().data_ptr()
        assert (p.data_ptr() - ema.online_flat.data_ptr()) % 256 == 0, "views start at aligned offsets"

    opt = LARS(online.parameters(), lr=0.5, eta=0.3)
    online(torch.randn(8, 3, 6, 6).to(memory_format=torch.channels_last)).square().mean().backward()
    for p in online.parameters():
        assert p.grad.untyped_storage().data_ptr() != ema.online_flat.untyped_storage().data_ptr()
    opt.step()  # in place on the views: the flat buffer sees the new values
    theta = [p.detach().clone() for p in online.parameters()]
    xi = [p.detach().clone() for p in target.parameters()]
    ema.update(0.7)
    for new, t, x in zip(target.parameters(), theta, xi):
        torch.testing.assert_close(new.detach(), 0.7 * x + 0.3 * t, atol=1e-6, rtol=0)


def test_flat_detects_replaced_param_data() -> None:
    online, target = make_pair()
    ema = FlatEMA(TargetEMA(online, target))
    online[3].weight.data = online[3].weight.data.clone()  # what .to()/.cuda() do
    with pytest.raises(RuntimeError, match="flat buffer"):
        ema.update(0.9)


def test_flatten_pads_to_aligned_offsets() -> None:
    params = [nn.Parameter(torch.randn(3, 5)), nn.Parameter(torch.randn(7))]
    values = [p.detach().clone() for p in params]
    flat = fused_ops.flatten_(params)
    assert flat.numel() == 64 + 64
    assert params[1].data_ptr() - flat.data_ptr() == 64 * flat.element_size()
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    assert torch.equal(flat[15:64], torch.zeros(49)), "padding is zeros"
