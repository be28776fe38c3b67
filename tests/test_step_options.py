"""Step options that are config keys (issue 12, item 3): what each one changes, checked on a CPU.

Their speed is measured by benchmarks/gpu_suite.py on a GPU; here only what they do:
- dist.gradient_as_bucket_view: gradients live inside DDP's all-reduce buckets (a few shared
  storages instead of one per parameter) and the step computes exactly the same parameters;
- model.compile_mode: validated, and handed to torch.compile;
- no host sync inside a step: train_step never converts a tensor to a Python value.
"""

from __future__ import annotations

import tempfile

import pytest
import torch
import torch.distributed as tdist

from fastbyol import dist
from fastbyol.config import ConfigError, load_config
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


def test_compile_mode_is_validated_and_handed_to_torch_compile(monkeypatch):
    with pytest.raises(ConfigError, match="model.compile_mode = 'fast'"):
        load_config(None, [*TINY, "model.compile_mode=fast"])
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.append(kw))
    cfg = load_config(None, [*TINY, "model.compile=true", "model.compile_mode=reduce-overhead"])
    build_components(cfg, torch.device("cpu"), dist.DistInfo(), peak_lr=0.1)
    assert seen == [{"mode": "reduce-overhead"}]


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
