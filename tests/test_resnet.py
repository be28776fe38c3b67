"""ResNet encoder: torchvision names/shapes, BYOL-paper widths, stems, init, channels_last."""

from __future__ import annotations

import math

import pytest
import torch

from fastbyol.models.resnet import resnet, resnet18, resnet50



def meta_resnet(depth: int, **kwargs):
    with torch.device("meta"):  # shapes without memory
        return resnet(depth, **kwargs)


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_state_dict_matches_torchvision(depth, torchvision_keys):
    expected = torchvision_keys(depth)
    ours = {k: list(v.shape) for k, v in meta_resnet(depth).state_dict().items()}
    assert list(ours) == list(expected)  # same keys, same order
    assert ours == expected


@pytest.mark.parametrize("width, millions", [(1, 23.5), (2, 93.9), (4, 375.4)])
def test_resnet50_parameter_count_as_in_byol_paper(width, millions):
    n = sum(p.numel() for p in meta_resnet(50, width=width).parameters())
    assert round(n / 1e6, 1) == millions


@pytest.mark.parametrize("depth, width, dim", [(18, 1, 512), (34, 2, 1024), (50, 1, 2048), (50, 2, 4096), (200, 1, 2048)])
def test_feature_dim(depth, width, dim):
    model = meta_resnet(depth, width=width)
    assert model.num_features == dim
    assert model(torch.empty(2, 3, 224, 224, device="meta")).shape == (2, dim)


def test_stride_on_3x3_conv_v1_5():
    block = meta_resnet(50).layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    assert block.downsample[0].stride == (2, 2)


def test_cifar_stem_keeps_32px_resolution():
    model = resnet18(stem="cifar").eval()
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    seen = {}
    model.layer4.register_forward_hook(lambda m, i, o: seen.update(shape=o.shape))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 512)
    assert seen["shape"] == (2, 512, 4, 4)  # 32 / 8: only layers 2-4 downsample


def test_unknown_depth_width_stem_raise():
    with pytest.raises(ValueError, match="depth = 42"):
        resnet(42)
    with pytest.raises(ValueError, match="width = 3"):
        resnet(50, width=3)
    with pytest.raises(ValueError, match="stem = 'tiny'"):
        resnet(50, stem="tiny")


def haiku_gamma_init(depth: int) -> dict[str, float]:
    """Initial BatchNorm scale per torchvision-named gamma, from Haiku's ResNet as the official code
    builds it (BlockV1: batchnorm_2, the bottleneck's last, has scale_init=zeros; all others ones)."""
    blocks = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3)}[depth]
    bottleneck = depth >= 50
    gammas = {"bn1.weight": 1.0}  # initial_batchnorm
    for g, n in enumerate(blocks):
        for b in range(n):
            prefix = f"layer{g + 1}.{b}."
            for i in range(3 if bottleneck else 2):  # batchnorm_0, _1, (_2)
                gammas[f"{prefix}bn{i + 1}.weight"] = 0.0 if i == 2 else 1.0
            if b == 0 and (bottleneck or g > 0):  # shortcut_batchnorm
                gammas[f"{prefix}downsample.1.weight"] = 1.0
    return gammas


@pytest.mark.parametrize("depth", [18, 50])
def test_zero_init_residual_is_the_official_haiku_init(depth):
    model = resnet(depth, zero_init_residual=True)
    ours = {n: p for n, p in model.named_parameters() if n.endswith(".weight") and p.ndim == 1}
    expected = haiku_gamma_init(depth)
    assert set(ours) == set(expected)
    for name, value in expected.items():
        assert bool((ours[name] == value).all()), name
    plain = resnet(depth, zero_init_residual=False)  # the option: every gamma starts at 1
    assert all(bool((p == 1).all()) for n, p in plain.named_parameters() if n in expected)


def test_config_default_is_the_official_init():
    from fastbyol.config import ModelConfig

    assert ModelConfig().zero_init_residual is True


def test_kaiming_fan_out_init():
    w = resnet50().layer3[0].conv2.weight  # 256 out channels, 3x3
    assert w.std().item() == pytest.approx(math.sqrt(2 / (256 * 9)), rel=0.02)
    assert abs(w.mean().item()) < 1e-3


def test_channels_last_matches_contiguous():  # 16 px keeps it fast; 2x2 at layer4
    torch.manual_seed(0)
    model = resnet18(stem="cifar")  # train mode: batch statistics, as in BYOL
    x = torch.randn(4, 3, 16, 16)
    ref = model(x)
    model_cl = model.to(memory_format=torch.channels_last)
    assert model_cl.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    out = model_cl(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
