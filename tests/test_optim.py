"""LARS against the official BYOL update written out per parameter; lr and tau schedules against their formulas."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fastbyol.optim import LARS, lr_at, tau_at

ETA = 0.3  # large enough that the trust ratio visibly shapes the update


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # no bias before a BatchNorm (it would get a zero gradient), as in ResNets
        self.fc1 = nn.Linear(6, 8, bias=False)
        self.bn1 = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 4, bias=False)
        self.bn2 = nn.BatchNorm1d(4)
        self.fc3 = nn.Linear(4, 3)
        nn.init.zeros_(self.fc3.weight)  # ||w|| = 0 on the first step: trust ratio falls back to 1
        self.unused = nn.Linear(3, 3)  # never in the forward: grad stays None
        self.dead = nn.Parameter(torch.zeros(5))  # grad 0 and w 0: ||w|| = ||u|| = 0, factor 1
        self.still = nn.Parameter(torch.ones(5))  # grad 0, w != 0, no weight decay: ||u|| = 0, factor 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc3(torch.relu(self.bn2(self.fc2(torch.relu(self.bn1(self.fc1(x)))))))
        return (h**2).mean() + h.sum() * 0.1 + (self.dead * 0.0).sum() + (self.still * 0.0).sum()


def make_groups(model: Tiny) -> list[dict]:
    excluded = [p for n, p in model.named_parameters() if n.endswith("bias") or n.startswith("bn")]
    raw = [model.fc3.weight, model.still]
    regular = [p for n, p in model.named_parameters() if not (n.endswith("bias") or n.startswith("bn")) and all(p is not q for q in raw)]
    return [
        {"params": regular, "weight_decay": 0.05, "lars_exclude": False},
        {"params": excluded, "weight_decay": 0.0, "lars_exclude": True},
        {"params": raw, "weight_decay": 0.0, "lars_exclude": False},  # trust ratio on the raw grad
    ]


def inputs(step: int) -> torch.Tensor:
    return torch.randn(16, 6, generator=torch.Generator().manual_seed(1000 + step))


def backward(model: nn.Module, step: int) -> None:
    model.zero_grad(set_to_none=True)
    model(inputs(step)).backward()


@torch.no_grad()
def reference_step(groups: list[dict], bufs: dict[int, torch.Tensor], momentum: float, eta: float) -> None:
    """The official BYOL LARS, written out with plain Python branches per parameter."""
    for group in groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            u = p.grad + group["weight_decay"] * p
            if not group["lars_exclude"]:
                w_norm, u_norm = p.norm().item(), u.norm().item()
                trust = eta * w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
                u = trust * u
            bufs[id(p)] = momentum * bufs.get(id(p), torch.zeros_like(p)) + u
            p -= group["lr"] * bufs[id(p)]


def run_both(foreach: bool, lrs: list[float]) -> tuple[Tiny, Tiny, Tiny]:
    torch.manual_seed(0)
    start = Tiny()
    model, ref = copy.deepcopy(start), copy.deepcopy(start)
    opt = LARS(make_groups(model), lr=lrs[0], momentum=0.9, eta=ETA, foreach=foreach)
    ref_groups, ref_bufs = make_groups(ref), {}
    for step, lr in enumerate(lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        for group in ref_groups:
            group["lr"] = lr
        backward(model, step)
        backward(ref, step)
        grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        opt.step()
        for p, g in zip(model.parameters(), grads):
            assert g is None and p.grad is None or torch.equal(p.grad, g), "step must not modify p.grad"
        reference_step(ref_groups, ref_bufs, momentum=0.9, eta=ETA)
    return start, model, ref


@pytest.mark.parametrize("foreach", [True, False])
def test_lars_matches_reference_over_steps(foreach: bool) -> None:
    lrs = [0.5, 0.3, 0.0, 0.8, 0.1, 0.4]  # lr changes between steps must act at once
    start, model, ref = run_both(foreach, lrs)
    for (name, p), q, s in zip(model.named_parameters(), ref.parameters(), start.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=f"{name} differs from the reference")
        if name.startswith("unused") or name in ("dead", "still"):
            assert torch.equal(p, s), f"{name} has no gradient or a zero update and must not move"
        else:
            assert (p - s).abs().max() > 1e-3, f"{name} did not move: the comparison would be vacuous"


class ForeachCalls(TorchDispatchMode):
    """Records every aten op an optimizer step dispatches (top level only: CPU's per-tensor loops
    inside a foreach op run below this mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.calls.append((func.name(), args))
        return func(*args, **(kwargs or {}))


def _fast_route(name: str, args: tuple) -> bool:
    """CUDA's multi-tensor route for a foreach op (ATen's can_use_fast_route): every tensor list
    has, index by index, the same shape, strides, dtype and device; addcmul also takes a list of
    0-d tensors as tensor1 (its 0-d route). Anything else runs one kernel per tensor."""
    lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
    if name.startswith("aten::_foreach_addcmul") and all(t.dim() == 0 for t in lists[1]):
        lists = [lists[0], lists[2]]
    ref = lists[0]
    return all(t.shape == r.shape and t.stride() == r.stride() and t.dtype == r.dtype and t.device == r.device
               for other in lists[1:] for t, r in zip(other, ref))


def test_lars_foreach_step_stays_on_cudas_multi_tensor_route() -> None:
    """Each op of a step runs once over all layers: the op count does not grow with the number of
    parameters, and every foreach op's lists qualify for CUDA's one-kernel route (a 0-d ratio list
    handed to _foreach_mul_ would fail it and launch a kernel per layer)."""
    def calls(n_layers: int) -> list[tuple[str, tuple]]:
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(n_layers)])
        opt = LARS(make_groups_of(model), lr=0.1, momentum=0.9, eta=ETA)
        model(torch.randn(3, 4)).square().sum().backward()
        opt.step()  # the first step creates the momentum buffers
        with ForeachCalls() as mode:
            opt.step()
        return mode.calls

    few, many = calls(2), calls(12)
    assert [name for name, _ in few] == [name for name, _ in many]
    foreach = [(name, args) for name, args in many if name.startswith("aten::_foreach")]
    assert foreach and all(_fast_route(name, args) for name, args in foreach), \
        [name for name, args in foreach if not _fast_route(name, args)]


def make_groups_of(model: nn.Module) -> list[dict]:
    weights = [p for p in model.parameters() if p.ndim > 1]
    biases = [p for p in model.parameters() if p.ndim == 1]
    return [{"params": weights, "weight_decay": 0.05, "lars_exclude": False},
            {"params": biases, "weight_decay": 0.0, "lars_exclude": True}]


def test_zero_weight_uses_trust_ratio_one_on_first_step() -> None:
    torch.manual_seed(0)
    model = Tiny()
    opt = LARS(make_groups(model), lr=0.5, momentum=0.9, eta=ETA)
    backward(model, 0)
    grad = model.fc3.weight.grad.clone()
    opt.step()
    # w = 0: u = g (its group has no weight decay either), unscaled; buf = u; w = -lr * g
    torch.testing.assert_close(model.fc3.weight, -0.5 * grad, atol=1e-7, rtol=0)
    assert torch.equal(model.fc3.weight.grad, grad), "step must not modify p.grad"


def test_new_lr_scales_the_whole_buffer_at_once() -> None:
    torch.manual_seed(0)
    model = Tiny()
    opt = LARS(make_groups(model), lr=0.5, momentum=0.9, eta=ETA)
    backward(model, 0)
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    for group in opt.param_groups:
        group["lr"] = 1.7
    backward(model, 1)
    opt.step()
    for p, b in zip(model.parameters(), before):
        if p.grad is not None:
            buf = opt.state[p]["momentum_buffer"]
            torch.testing.assert_close(p - b, -1.7 * buf, atol=1e-6, rtol=0)
    assert model.unused.weight not in opt.state, "no state for a parameter that never had a gradient"


def test_state_dict_round_trip_continues_identically() -> None:
    torch.manual_seed(0)
    model = Tiny()
    opt = LARS(make_groups(model), lr=0.4, momentum=0.9, eta=ETA)
    for step in range(3):
        backward(model, step)
        opt.step()
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for step in range(3, 6):
        backward(model, step)
        opt.step()

    resumed = Tiny()
    resumed.load_state_dict(saved_model)
    resumed_opt = LARS(make_groups(resumed), lr=123.0, momentum=0.5, eta=1.0)  # overwritten by the load
    resumed_opt.load_state_dict(saved_opt)
    assert resumed_opt.param_groups[0]["lr"] == 0.4 and resumed_opt.param_groups[0]["eta"] == ETA
    for step in range(3, 6):
        backward(resumed, step)
        resumed_opt.step()
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), f"{name} diverged after resume"


def test_per_group_options_override_defaults() -> None:
    w = nn.Parameter(torch.ones(3))
    w.grad = torch.ones(3)
    opt = LARS([{"params": [w], "momentum": 0.0, "lars_exclude": True}], lr=0.1, momentum=0.9, weight_decay=0.5)
    opt.step()
    # excluded: u = g + 0.5 * w = 1.5, no trust ratio; w = 1 - 0.1 * 1.5
    torch.testing.assert_close(w.detach(), torch.full((3,), 0.85))


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(lr=-0.1), "lr"),
        (dict(lr=0.1, momentum=1.0), "momentum"),
        (dict(lr=0.1, momentum=-0.1), "momentum"),
        (dict(lr=0.1, weight_decay=-1e-6), "weight_decay"),
        (dict(lr=0.1, eta=0.0), "eta"),
        (dict(lr=0.1, lars_exclude="yes"), "lars_exclude"),
    ],
)
def test_bad_options_raise(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        LARS([nn.Parameter(torch.ones(2))], **kwargs)


def test_bad_group_option_names_the_group() -> None:
    with pytest.raises(ValueError, match="group 1.*momentum"):
        LARS([{"params": [nn.Parameter(torch.ones(2))]}, {"params": [nn.Parameter(torch.ones(2))], "momentum": 2.0}], lr=0.1)


def test_lr_schedule() -> None:
    total, warmup, peak = 1000, 100, 4.8
    assert lr_at(0, total, warmup, peak) == 0.0
    for step in (1, 25, 50, 99):
        assert lr_at(step, total, warmup, peak) == pytest.approx(peak * step / warmup)
    assert lr_at(warmup, total, warmup, peak) == pytest.approx(peak)
    assert lr_at(warmup + (total - warmup) // 2, total, warmup, peak) == pytest.approx(peak / 2)
    quarter = warmup + (total - warmup) // 4
    assert lr_at(quarter, total, warmup, peak) == pytest.approx(peak * (1 + math.cos(math.pi / 4)) / 2, rel=1e-3)
    assert lr_at(total, total, warmup, peak) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(total + 5, total, warmup, peak) == pytest.approx(0.0, abs=1e-12)
    decay = [lr_at(s, total, warmup, peak) for s in range(warmup, total + 1)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert lr_at(0, 10, 0, 1.0) == 1.0  # no warm-up: the cosine starts at the peak


def test_tau_schedule() -> None:
    total, base = 500, 0.996
    assert tau_at(0, total, base) == pytest.approx(base)
    assert tau_at(total, total, base) == pytest.approx(1.0)
    assert tau_at(total // 2, total, base) == pytest.approx(1 - (1 - base) / 2)
    taus = [tau_at(s, total, base) for s in range(total + 1)]
    assert all(a < b for a, b in zip(taus, taus[1:]))


@pytest.mark.parametrize(
    "call, key",
    [
        (lambda: lr_at(-1, 10, 2, 0.1), "step"),
        (lambda: lr_at(0, 0, 0, 0.1), "total_steps"),
        (lambda: lr_at(0, 10, 10, 0.1), "warmup_steps"),
        (lambda: lr_at(0, 10, 2, -0.1), "peak_lr"),
        (lambda: tau_at(0, 10, 1.5), "tau_base"),
        (lambda: tau_at(-1, 10, 0.99), "step"),
        (lambda: tau_at(0, 0, 0.99), "total_steps"),
    ],
)
def test_schedule_arguments_validated(call, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        call()


def test_run_plan_derives_steps_and_schedules_once():
    from fastbyol.config import load_config
    from fastbyol.optim import RunPlan

    cfg = load_config(None, ["data.backend=synthetic", "data.batch_size=512", "train.epochs=3", "optim.warmup_epochs=1", "optim.base_lr=0.2",
                             "byol.tau_base=0.99"])
    plan = RunPlan.of(cfg, steps_per_epoch=10)
    assert (plan.total_steps, plan.warmup_steps, plan.peak_lr) == (30, 10, pytest.approx(0.4))
    assert plan.lr(5) == pytest.approx(0.2) and plan.lr(10) == pytest.approx(0.4)  # linear warm-up to the peak
    assert plan.lr(20) == pytest.approx(0.2)  # half-way down the cosine
    assert plan.tau(0) == pytest.approx(0.99) and plan.tau(30) == 1.0 and plan.tau(99) == 1.0
    assert plan.lr(30) == 0.0 and plan.lr(99) == 0.0 and plan.epoch(29) == 2
    short = RunPlan.of(load_config(None, ["data.backend=synthetic", "train.max_steps=4", "optim.warmup_epochs=10"]), steps_per_epoch=10)
    assert (short.total_steps, short.warmup_steps) == (4, 3)  # warm-up clamped inside the run
