"""BYOL module: the loss against the paper's formula, symmetry, gradient isolation, param groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastbyol.byol import BYOL, MLP, param_groups, regression_loss
from fastbyol.models.resnet import resnet18


def tiny_byol(concat_views: bool = False) -> BYOL:
    torch.manual_seed(0)
    encoder = resnet18(stem="cifar")
    return BYOL(encoder, encoder.num_features, hidden_dim=32, proj_dim=16, concat_views=concat_views)


def views(b: int = 4, side: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 3, side, side, generator=g), torch.randn(b, 3, side, side, generator=g)


def test_regression_loss_is_2_minus_2_cos():
    g = torch.Generator().manual_seed(0)
    p, z = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    pn, zn = p.double().numpy(), z.double().numpy()
    cos = (pn * zn).sum(1) / np.sqrt((pn**2).sum(1) * (zn**2).sum(1))
    np.testing.assert_allclose(regression_loss(p, z).numpy(), 2 - 2 * cos, rtol=1e-5, atol=1e-6)
    assert regression_loss(p, 3 * p).abs().max() < 1e-6  # scale-invariant, 0 when aligned
    torch.testing.assert_close(regression_loss(p, -p), torch.full((8,), 4.0))


def test_regression_loss_float32_and_eps_safe():
    p = torch.randn(4, 8).bfloat16()
    assert regression_loss(p, p).dtype == torch.float32
    out = regression_loss(torch.zeros(2, 8), torch.randn(2, 8))
    assert torch.isfinite(out).all() and torch.equal(out, torch.full((2,), 2.0))


def test_mlp_layout_is_the_official_heads():
    # byol/utils/networks.py MLP: Linear(with_bias=True) -> BatchNorm -> relu -> Linear(with_bias=False)
    mlp = MLP(12, 32, 16)
    assert [type(m).__name__ for m in mlp] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert mlp[0].bias is not None and mlp[3].bias is None
    assert mlp(torch.randn(3, 12)).shape == (3, 16)
    model = tiny_byol()
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if "encoder" not in n}
    assert shapes == {
        **{f"{net}.0.weight": (32, i) for net, i in (("online_projector", 512), ("target_projector", 512), ("predictor", 16))},
        **{f"{net}.{k}": (32,) for net in ("online_projector", "target_projector", "predictor")
           for k in ("0.bias", "1.weight", "1.bias")},
        **{f"{net}.3.weight": (16, 32) for net in ("online_projector", "target_projector", "predictor")},
    }


def test_forward_matches_definition():
    model = tiny_byol()
    v1, v2 = views()
    out = model(v1, v2)
    # recompute by hand; train mode, per-view calls: the same batch statistics as forward()
    y1 = model.online_projector(model.online_encoder(v1))
    y2 = model.online_projector(model.online_encoder(v2))
    p1, p2 = model.predictor(y1), model.predictor(y2)
    z1 = model.target_projector(model.target_encoder(v1))
    z2 = model.target_projector(model.target_encoder(v2))
    c12, c21 = F.cosine_similarity(p1, z2, dim=1), F.cosine_similarity(p2, z1, dim=1)
    torch.testing.assert_close(out.loss, (2 - 2 * c12).mean() + (2 - 2 * c21).mean())
    torch.testing.assert_close(out.cosine, torch.cat([c12, c21]).mean().detach())
    y = torch.cat([y1, y2]).detach().double().numpy()
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    assert out.collapse_std.item() == pytest.approx(y.std(axis=0, ddof=1).mean(), rel=1e-4)
    assert 0 <= out.loss.item() <= 8 and out.loss.requires_grad
    assert not out.cosine.requires_grad and not out.collapse_std.requires_grad


@pytest.mark.parametrize("concat_views", [False, True])
def test_loss_symmetric_in_the_views(concat_views):
    # Train mode is deterministic here: per-view BN statistics do not depend on the other view,
    # and concatenated statistics do not depend on the order of the two halves.
    model = tiny_byol(concat_views)
    v1, v2 = views()
    with torch.no_grad():
        a, b = model(v1, v2).loss, model(v2, v1).loss
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_concat_views_equals_separate_in_eval_mode():
    # In eval mode BN uses running statistics, so batching the two views together changes nothing.
    model = tiny_byol().eval()
    v1, v2 = views()
    with torch.no_grad():
        separate = model(v1, v2)
        model.concat_views = True
        together = model(v1, v2)
    for a, b in zip(separate, together):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_channels_last_forward():
    # the GPU training path (autocast bf16, channels_last), exercised on the CPU
    model = tiny_byol().to(memory_format=torch.channels_last)
    # 16 px: at 8 px layer4 is 1x1 and BN over 4 values amplifies bf16 rounding
    v1, v2 = (v.to(memory_format=torch.channels_last) for v in views(side=16))
    with torch.no_grad():
        ref = model(v1, v2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(v1, v2)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert abs(out.loss.item() - ref.loss.item()) < 0.1  # measured 0.009


def test_target_starts_as_copy_and_zips_with_online():
    model = tiny_byol()
    online, target = model.online_network(), model.target_network()
    on = list(online.named_parameters()) + list(online.named_buffers())
    tg = list(target.named_parameters()) + list(target.named_buffers())
    assert [n for n, _ in on] == [n for n, _ in tg]
    assert all(torch.equal(a, b) and a.data_ptr() != b.data_ptr() for (_, a), (_, b) in zip(on, tg))
    assert all(not p.requires_grad for p in target.parameters())


def test_sgd_step_moves_online_only():
    model = tiny_byol()
    v1, v2 = views()
    online_before = {n: p.detach().clone() for n, p in model.online_named_parameters()}
    target_before = [p.detach().clone() for p in model.target_network().parameters()]
    opt = torch.optim.SGD(param_groups(model, weight_decay=1e-4), lr=0.5)
    model(v1, v2).loss.backward()
    assert all(p.grad is None for p in model.target_network().parameters())
    assert all(p.grad is not None for p in model.online_parameters())
    opt.step()
    changed = {n for n, p in model.online_named_parameters() if not torch.equal(p, online_before[n])}
    assert changed == set(online_before)
    assert all(torch.equal(a, b) for a, b in zip(model.target_network().parameters(), target_before))


def test_param_groups_cover_online_once_with_exclusions():
    model = tiny_byol()
    decay, no_decay = param_groups(model, weight_decay=1.5e-6)
    assert decay["weight_decay"] == 1.5e-6 and decay["lars_exclude"] is False
    assert no_decay["weight_decay"] == 0.0 and no_decay["lars_exclude"] is True
    grouped = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(grouped) == trainable
    assert not set(grouped) & {id(p) for p in model.target_network().parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    excluded = {names[id(p)] for p in no_decay["params"]}
    bn_and_bias = {n for n, p in model.named_parameters() if p.requires_grad and (n.endswith("bias") or p.ndim == 1)}
    assert excluded == bn_and_bias
    assert "online_encoder.bn1.weight" in excluded and "predictor.0.bias" in excluded
    assert "online_encoder.conv1.weight" not in excluded and "predictor.3.weight" not in excluded
