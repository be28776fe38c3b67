"""Step options that are config keys (issue 12, item 3): what each one changes, checked on a CPU.

Their speed is measured by benchmarks/gpu_suite.py on a GPU; here only what they do:
- dist.gradient_as_bucket_view: gradients live inside DDP's all-reduce buckets (a few shared
  storages instead of one per parameter) and the step computes exactly the same parameters;
- model.compile: each network compiled on its own (mode and backend validated together), and
  training as the eager networks do;
- no host sync inside a step: train_step never converts a tensor to a Python value.
"""

from __future__ import annotations

import copy
import math
import tempfile

import pytest
import torch
import torch.distributed as tdist

from fastbyol import dist
from fastbyol.byol import BYOL, param_groups
from fastbyol.config import ConfigError, load_config
from fastbyol.optim import RunPlan
from fastbyol.step import build_components, train_step

pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny models: one torch thread

TINY = ["model.depth=18", "model.stem=cifar", "byol.hidden_dim=64", "byol.proj_dim=32", "train.precision=fp32",
        "train.device=cpu", "data.backend=synthetic", "data.batch_size=4", "dist.sync_bn=false"]


class OneRankDDP(dist.DistInfo):
    """A process group of one rank, wrapped in DDP as a multi-rank run would be."""

    enabled = True


@pytest.fixture
def one_rank_group(tmp_path):
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    tdist.destroy_process_group()


def views() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(4, 3, 16, 16, generator=g).contiguous(memory_format=torch.channels_last)
                 for _ in range(2))


def grad_storages_and_state(bucket_view: bool) -> tuple[int, int, dict]:
    """(distinct gradient storages after a backward, parameters with a gradient, state after 2 steps)."""
    cfg = load_config(None, [*TINY, f"dist.gradient_as_bucket_view={str(bucket_view).lower()}"])
    c = build_components(cfg, torch.device("cpu"), OneRankDDP(), peak_lr=0.1)
    assert isinstance(c.model, torch.nn.parallel.DistributedDataParallel)
    view1, view2 = views()
    for _ in range(2):
        train_step(c, view1, view2, 0.1, 0.99)
    c.model(view1, view2).loss.backward()  # gradients as the optimizer would see them
    grads = [p.grad for p in c.byol.parameters() if p.grad is not None]
    storages = {g.untyped_storage().data_ptr() for g in grads}
    return len(storages), len(grads), {k: v.detach().clone() for k, v in c.byol.state_dict().items()}


def test_gradient_as_bucket_view_puts_grads_in_the_buckets_and_changes_no_result(one_rank_group):
    own_storages, n_grads, state_plain = grad_storages_and_state(bucket_view=False)
    shared_storages, n_grads_bv, state_bv = grad_storages_and_state(bucket_view=True)
    assert n_grads == n_grads_bv > 20
    assert own_storages == n_grads  # one storage per gradient: DDP copies buckets into them
    assert shared_storages < n_grads / 10  # views into a few buckets: no copy, no second buffer
    for key in state_plain:
        torch.testing.assert_close(state_bv[key], state_plain[key], rtol=0, atol=0, msg=key)


def test_compile_options_are_validated_and_each_network_is_compiled_on_its_own(monkeypatch):
    with pytest.raises(ConfigError, match="model.compile_mode = 'fast'"):
        load_config(None, [*TINY, "model.compile_mode=fast"])
    with pytest.raises(ConfigError, match="model.compile_mode = 'reduce-overhead' needs model.compile_backend"):
        load_config(None, [*TINY, "model.compile_mode=reduce-overhead", "model.compile_backend=aot_eager"])
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append((fn, kw)) or fn)
    cfg = load_config(None, [*TINY, "model.compile=true", "model.compile_mode=reduce-overhead"])
    c = build_components(cfg, torch.device("cpu"), dist.DistInfo(), peak_lr=0.1)
    # the online and the target network's forward functions, of this model; not the BYOL forward
    assert [(fn.__func__, fn.__self__) for fn, _ in seen] == [(BYOL._online, c.byol), (BYOL._target, c.byol)]
    assert all(kw == {"backend": "inductor", "mode": "reduce-overhead"} for _, kw in seen)


def _two_steps(*overrides: str) -> tuple[list[float], dict]:
    cfg = load_config(None, [*TINY, *overrides])
    c = build_components(cfg, torch.device("cpu"), dist.DistInfo(), peak_lr=0.1)
    view1, view2 = views()
    losses = [train_step(c, view1, view2, 0.1, 0.99).loss.item() for _ in range(2)]
    return losses, {k: v.detach().clone() for k, v in c.byol.state_dict().items()}


def test_compiled_networks_train_as_the_eager_ones():
    """model.compile through torch.compile for real (aot_eager: dynamo's graphs and AOT autograd's
    forward and backward, without inductor's code generation, which takes minutes on a CPU): the
    online and the target network each become a compiled frame, and two steps give the losses and
    parameters of eager networks."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled_losses, compiled_state = _two_steps("model.compile=true", "model.compile_backend=aot_eager")
    frames = dict(torch._dynamo.utils.counters["frames"])
    eager_losses, eager_state = _two_steps()
    assert frames.get("ok", 0) >= 2 and frames.get("ok") == frames.get("total"), frames
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-6)
    for key in eager_state:
        torch.testing.assert_close(compiled_state[key], eager_state[key], rtol=1e-5, atol=1e-6, msg=key)


HOST_CONVERSIONS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__")


def test_a_training_step_never_waits_for_the_device(monkeypatch):
    """Every way Python code can pull a tensor's value to the host raises inside train_step: on a GPU
    each would be a host sync. (C++-internal syncs are checked on the GPU by benchmarks/gpu_suite.py
    with torch.cuda.set_sync_debug_mode.)"""
    cfg = load_config(None, TINY)
    c = build_components(cfg, torch.device("cpu"), dist.DistInfo(), peak_lr=0.1)
    view1, view2 = views()
    before = train_step(c, view1, view2, 0.1, 0.99).loss.item()

    def forbidden(name: str):
        def raise_(*args, **kwargs):
            raise AssertionError(f"train_step called Tensor.{name}: a host sync on a GPU")
        return raise_

    with monkeypatch.context() as patch:
        for name in HOST_CONVERSIONS:
            patch.setattr(torch.Tensor, name, forbidden(name))
        with pytest.raises(AssertionError, match="Tensor.item"):
            torch.ones(1).item()  # the patch is in force
        out = train_step(c, view1, view2, 0.1, 0.99)
    assert out.loss.item() < before + 1.0 and torch.isfinite(out.loss)


def test_optim_lars_false_steps_as_torch_sgd_with_momentum_on_the_same_groups():
    """optim.lars=false: no trust ratio on any group, so the optimizer build_components makes takes the
    steps of torch.optim.SGD (momentum, weight decay on the weights only); eta then plays no part."""
    cfg = load_config(None, [*TINY, "optim.lars=false", "optim.eta=0.5", "optim.weight_decay=0.01"])
    c = build_components(cfg, torch.device("cpu"), dist.DistInfo(), peak_lr=0.1)
    reference = copy.deepcopy(c.byol)
    sgd = torch.optim.SGD(param_groups(reference, 0.01), lr=0.1, momentum=cfg.optim.momentum)
    assert [g["weight_decay"] for g in sgd.param_groups] == [0.01, 0.0]
    view1, view2 = views()
    for _ in range(3):
        for model, optimizer in ((c.byol, c.optimizer), (reference, sgd)):
            optimizer.zero_grad()
            model(view1, view2).loss.backward()
            optimizer.step()
    for (name, p), q in zip(c.byol.online_named_parameters(), (q for _, q in reference.online_named_parameters())):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    # the default (LARS) is a different step: the key is what made them equal
    lars = build_components(load_config(None, [*TINY, "optim.eta=0.5", "optim.weight_decay=0.01"]),
                            torch.device("cpu"), dist.DistInfo(), peak_lr=0.1)
    assert [g["lars_exclude"] for g in lars.optimizer.param_groups] == [False, True]
    assert [g["lars_exclude"] for g in c.optimizer.param_groups] == [True, True]


def test_predictor_lr_scale_steps_the_predictor_at_that_multiple_of_the_lr():
    """optim.predictor_lr_scale=10: train_step steps the predictor (weights, biases, BatchNorm) at 10x
    the scheduled lr and everything else at 1x, as torch.optim.SGD with two hand-made lr groups does."""
    cfg = load_config(None, [*TINY, "optim.lars=false", "optim.weight_decay=0.01", "optim.predictor_lr_scale=10"])
    c = build_components(cfg, torch.device("cpu"), dist.DistInfo(), peak_lr=0.1)
    reference = copy.deepcopy(c.byol)
    named = list(reference.online_named_parameters())
    groups = [{"params": [p for n, p in named if n.startswith("predictor.") == is_predictor and (p.ndim > 1) == decay],
               "lr": 0.1 * (10 if is_predictor else 1), "weight_decay": 0.01 if decay else 0.0}
              for is_predictor in (False, True) for decay in (True, False)]
    assert sum(len(g["params"]) for g in groups) == len(named) and all(g["params"] for g in groups)
    sgd = torch.optim.SGD(groups, lr=0.1, momentum=cfg.optim.momentum)
    view1, view2 = views()
    for _ in range(3):
        train_step(c, view1, view2, lr=0.1, tau=1.0)  # tau 1: the target stays as built, as the reference's
        sgd.zero_grad()
        reference(view1, view2).loss.backward()
        sgd.step()
    for (name, p), q in zip(c.byol.online_named_parameters(), (q for _, q in reference.online_named_parameters())):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert sorted(g["lr_scale"] for g in c.optimizer.param_groups) == [1.0, 1.0, 10.0, 10.0]
    # the paper's default keeps its two groups, so checkpoints written before the key still resume
    assert len(build_components(load_config(None, TINY), torch.device("cpu"), dist.DistInfo(), 0.1).optimizer.param_groups) == 2


def test_predictor_lr_hold_keeps_the_predictors_lr_at_its_peak_after_warm_up():
    """optim.predictor_lr_hold: through a run's plan (2 warm-up steps, then the cosine), the predictor
    steps at the warm-up ramp and then at the peak x its scale, the rest at the schedule's lr, as
    torch.optim.SGD does with two hand-set lr groups."""
    cfg = load_config(None, [*TINY, "optim.lars=false", "optim.weight_decay=0", "optim.predictor_lr_scale=3",
                                   "optim.predictor_lr_hold=true"])
    plan = RunPlan(steps_per_epoch=6, total_steps=6, warmup_steps=2, peak_lr=0.1, tau_base=1.0)
    c = build_components(cfg, torch.device("cpu"), dist.DistInfo(), peak_lr=plan.peak_lr)
    reference = copy.deepcopy(c.byol)
    named = list(reference.online_named_parameters())
    groups = [{"params": [p for n, p in named if n.startswith("predictor.") == is_predictor]}
              for is_predictor in (False, True)]
    sgd = torch.optim.SGD(groups, lr=0.1, momentum=cfg.optim.momentum, weight_decay=0.0)
    # by hand: warm-up 0, peak / 2, then the cosine over the 4 steps left for the rest (halved by
    # step 4), the peak for good for the predictor
    scheduled = [0.0, 0.05, 0.1, 0.1 * (1 + math.cos(math.pi / 4)) / 2, 0.05]
    held = [0.0, 0.05, 0.1, 0.1, 0.1]
    view1, view2 = views()
    for step in range(5):
        assert (plan.lr(step), plan.held_lr(step)) == (pytest.approx(scheduled[step]), pytest.approx(held[step]))
        train_step(c, view1, view2, plan.lr(step), tau=1.0, held_lr=plan.held_lr(step))
        sgd.param_groups[0]["lr"], sgd.param_groups[1]["lr"] = scheduled[step], 3 * held[step]
        sgd.zero_grad()
        reference(view1, view2).loss.backward()
        sgd.step()
    for (name, p), q in zip(c.byol.online_named_parameters(), (q for _, q in reference.online_named_parameters())):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert [g["hold_lr"] for g in c.optimizer.param_groups] == [False, False, True, True]
