"""ResNet encoders for BYOL: depths 18-200, width multipliers 1x/2x/4x, ImageNet or CIFAR stem.

Module and parameter names are torchvision's (conv1, bn1, layer1.0.conv1, layerX.0.downsample.0/1)
so an exported width-1x ImageNet-stem encoder loads into `torchvision.models.resnetN()` with
`strict=False` (only fc.* is missing: the encoder has no classifier). The stride of a downsampling
bottleneck sits on its 3x3 conv (ResNet v1.5, as in torchvision and the official BYOL code).

The width multiplier scales every width, as in the BYOL paper (stem 64*width, block widths and
block outputs), unlike torchvision's wide_resnet50_2 which widens only the bottleneck's inside.
ResNet-50 encoder parameters: 1x 23.5M, 2x 93.9M, 4x 375.4M.
"""

from __future__ import annotations

import torch
from torch import nn

STAGES = {  # depth -> (block kind, blocks per stage)
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}
WIDTHS = (1, 2, 4)
STEMS = ("imagenet", "cifar")


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(in_ch, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(in_ch, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)  # v1.5: stride on the 3x3, not the 1x1
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def make_layer(block: type[BasicBlock] | type[Bottleneck], in_ch: int, planes: int, n: int, stride: int) -> nn.Sequential:
    """One stage of `n` blocks; the first changes resolution (`stride`) and channels."""
    out_ch = planes * block.expansion
    downsample = None
    if stride != 1 or in_ch != out_ch:  # projection shortcut, torchvision's "downsample.0/1"
        downsample = nn.Sequential(conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))
    layers = [block(in_ch, planes, stride, downsample)]
    layers += [block(out_ch, planes) for _ in range(n - 1)]
    return nn.Sequential(*layers)


class ResNet(nn.Module):
    """ResNet trunk without classifier: (B, 3, H, W) images -> (B, num_features) pooled features."""

    def __init__(self, depth: int, width: int = 1, stem: str = "imagenet", zero_init_residual: bool = False):
        super().__init__()
        if depth not in STAGES:
            raise ValueError(f"resnet depth = {depth!r}: expected one of {', '.join(map(str, STAGES))}")
        if width not in WIDTHS:
            raise ValueError(f"resnet width = {width!r}: expected one of {', '.join(map(str, WIDTHS))}")
        if stem not in STEMS:
            raise ValueError(f"resnet stem = {stem!r}: expected one of {', '.join(STEMS)}")
        kind, blocks = STAGES[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.depth, self.width, self.stem = depth, width, stem

        stem_ch = 64 * width
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, stem_ch, 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        else:  # CIFAR-sized inputs (32 px) keep their resolution in the stem
            self.conv1 = nn.Conv2d(3, stem_ch, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(stem_ch)
        self.relu = nn.ReLU(inplace=True)
        in_ch = stem_ch
        for i, n in enumerate(blocks):
            planes = 64 * 2**i * width
            self.add_module(f"layer{i + 1}", make_layer(block, in_ch, planes, n, stride=1 if i == 0 else 2))
            in_ch = planes * block.expansion
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = in_ch  # 512 * width * expansion

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # each bottleneck starts as the identity, as in the official code
            # (Haiku's BlockV1 builds its last BatchNorm with scale_init=zeros only when bottleneck
            # is True; its basic blocks, ResNet-18/34, keep gamma = 1, and so do ours)
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.last_bn().weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float images (any memory format) -> (B, num_features) features."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def resnet(depth: int, width: int = 1, stem: str = "imagenet", zero_init_residual: bool = False) -> ResNet:
    """A ResNet-`depth` encoder (18, 34, 50, 101, 152, 200) of `width` 1, 2 or 4, stem imagenet|cifar.

    zero_init_residual: the last BatchNorm gamma of every bottleneck block (depth >= 50) starts at
    0, as Haiku's ResNet in the official BYOL code does; basic blocks always start at gamma = 1.

    Output: (B, 512*width) features for depth 18/34, (B, 2048*width) for 50 and deeper.
    Build on `with torch.device("meta"):` to inspect shapes or count parameters without memory.
    """
    return ResNet(depth, width=width, stem=stem, zero_init_residual=zero_init_residual)


def resnet18(**kwargs) -> ResNet:
    return resnet(18, **kwargs)


def resnet34(**kwargs) -> ResNet:
    return resnet(34, **kwargs)


def resnet50(**kwargs) -> ResNet:
    return resnet(50, **kwargs)


def resnet101(**kwargs) -> ResNet:
    return resnet(101, **kwargs)


def resnet152(**kwargs) -> ResNet:
    return resnet(152, **kwargs)


def resnet200(**kwargs) -> ResNet:
    return resnet(200, **kwargs)
