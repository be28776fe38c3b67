"""TargetEMA against xi <- tau * xi + (1 - tau) * theta computed per parameter; BN buffer rule."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fastbyol.ema import TargetEMA
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


def test_update_is_the_ema_formula() -> None:
    online, target = make_pair()
    ema = TargetEMA(online, target)
    for tau in (0.99, 0.5, 0.9):
        theta = [p.detach().clone() for p in online.parameters()]
        xi = [p.detach().clone() for p in target.parameters()]
        ema.update(tau)
        for (name, new), t, x in zip(target.named_parameters(), theta, xi):
            torch.testing.assert_close(new.detach(), tau * x + (1 - tau) * t, atol=1e-6, rtol=0, msg=name)
        for p, t in zip(online.parameters(), theta):
            assert torch.equal(p, t), "the online network must not change"


def test_bn_buffers_target_keeps_its_statistics_and_copies_counters() -> None:
    online, target = make_pair()
    running = {n: b.clone() for n, b in target.named_buffers() if b.is_floating_point()}
    assert any(not torch.equal(b, dict(online.named_buffers())[n]) for n, b in running.items())
    TargetEMA(online, target).update(0.9)
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
    ema.update(0.0)
    assert all(torch.equal(p, q) for p, q in zip(target.parameters(), online.parameters()))


def test_mismatched_modules_raise() -> None:
    with pytest.raises(ValueError, match=r"'1.weight'.*\(3, 4\).*'1.weight'.*\(3, 5\)"):
        TargetEMA(nn.Sequential(nn.ReLU(), nn.Linear(4, 3)), nn.Sequential(nn.ReLU(), nn.Linear(5, 3)))
    with pytest.raises(ValueError, match="online has 2 parameters, target has 4"):
        TargetEMA(nn.Linear(4, 3), nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="tau"):
        TargetEMA(nn.Linear(2, 2), nn.Linear(2, 2)).update(1.5)
