"""TargetEMA against xi <- tau * xi + (1 - tau) * theta computed per parameter; BN buffer rule; flat views."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastbyol.ema import TargetEMA, flatten_
from fastbyol.optim import LARS


def make_pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    online = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 5), nn.BatchNorm1d(5))
    target = copy.deepcopy(online)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(torch.randn_like(p))  # the two networks differ, so the average is not trivial
    online(torch.randn(8, 3, 6, 6))  # both networks accumulate different BN statistics and counters
    online(torch.randn(8, 3, 6, 6))
    target(torch.randn(8, 3, 6, 6))
    return online, target


@pytest.mark.parametrize("flat", [False, True])
def test_update_is_the_ema_formula(flat: bool) -> None:
    online, target = make_pair()
    ema = TargetEMA(online, target, flat=flat)
    for tau in (0.99, 0.5, 0.9):
        theta = [p.detach().clone() for p in online.parameters()]
        xi = [p.detach().clone() for p in target.parameters()]
        ema.update(tau)
        for (name, new), t, x in zip(target.named_parameters(), theta, xi):
            torch.testing.assert_close(new.detach(), tau * x + (1 - tau) * t, atol=1e-6, rtol=0, msg=name)
        for p, t in zip(online.parameters(), theta):
            assert torch.equal(p, t), "the online network must not change"


@pytest.mark.parametrize("flat", [False, True])
def test_bn_buffers_target_keeps_its_statistics_and_copies_counters(flat: bool) -> None:
    online, target = make_pair()
    running = {n: b.clone() for n, b in target.named_buffers() if b.is_floating_point()}
    assert any(not torch.equal(b, dict(online.named_buffers())[n]) for n, b in running.items())
    TargetEMA(online, target, flat=flat).update(0.9)
    for name, b in target.named_buffers():
        if b.is_floating_point():
            assert torch.equal(b, running[name]), f"{name}: the target keeps its own running statistics"
        else:
            assert torch.equal(b, dict(online.named_buffers())[name]), f"{name}: counters are copied"
            assert b.item() == 2


def test_tau_zero_copies_and_tau_one_keeps() -> None:
    online, target = make_pair()
    ema = TargetEMA(online, target)
    before = [p.detach().clone() for p in target.parameters()]
    ema.update(1.0)
    assert all(torch.equal(p, b) for p, b in zip(target.parameters(), before))
    ema.copy_online_to_target()
    assert all(torch.equal(p, q) for p, q in zip(target.parameters(), online.parameters()))


def test_mismatched_modules_raise() -> None:
    with pytest.raises(ValueError, match=r"'1.weight'.*\(3, 4\).*'1.weight'.*\(3, 5\)"):
        TargetEMA(nn.Sequential(nn.ReLU(), nn.Linear(4, 3)), nn.Sequential(nn.ReLU(), nn.Linear(5, 3)))
    with pytest.raises(ValueError, match="online has 2 parameters, target has 4"):
        TargetEMA(nn.Linear(4, 3), nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="tau"):
        TargetEMA(nn.Linear(2, 2), nn.Linear(2, 2)).update(1.5)


def test_flat_views_stay_live_under_the_optimizer() -> None:
    online, target = make_pair()
    online = online.to(memory_format=torch.channels_last)
    ema = TargetEMA(online, target, flat=True)
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
    ema = TargetEMA(online, target, flat=True)
    online[3].weight.data = online[3].weight.data.clone()  # what .to()/.cuda() do
    with pytest.raises(RuntimeError, match="flat buffer"):
        ema.update(0.9)


def test_flatten_pads_to_aligned_offsets() -> None:
    params = [nn.Parameter(torch.randn(3, 5)), nn.Parameter(torch.randn(7))]
    values = [p.detach().clone() for p in params]
    flat = flatten_(params)
    assert flat.numel() == 64 + 64
    assert params[1].data_ptr() - flat.data_ptr() == 64 * flat.element_size()
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    assert torch.equal(flat[15:64], torch.zeros(49)), "padding is zeros"
