"""CIFAR-style networks (32x32 input): ResNet-56 and Wide-ResNet-28-10.

* ``resnet56`` — He et al. 2016, §4.2: a 3x3 stem with 16 channels, three stages of 9 basic
  blocks with 16/32/64 channels, global average pooling, a linear classifier. The shortcut where
  the shape changes is a 1x1 convolution + BN (option B; the zero-padding option A has no weights
  to prune and is not traceable as a channel dependency).
* ``wrn28_10`` — Zagoruyko & Komodakis 2016: pre-activation basic blocks (BN-ReLU-conv), four
  blocks per stage, widths 160/320/640, a 1x1 convolution shortcut where the shape changes,
  optional dropout between the two convolutions.

``num_classes`` defaults to 100 (CIFAR-100, the S2HPruner paper's benchmark).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CifarResNet", "WideResNet", "resnet56", "wrn28_10"]


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int = 56, num_classes: int = 100, widths=(16, 32, 64)):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CifarResNet: depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, in_planes = [], widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, w, 2 if (j == 0 and i > 0) else 1))
                in_planes = w
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class WideBasicBlock(nn.Module):
    """Pre-activation: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, plus the shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.equal_in_out = in_planes == planes and stride == 1
        self.shortcut = None if self.equal_in_out else nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        y = self.conv1(o)
        y = self.conv2(self.dropout(F.relu(self.bn2(y))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 100, dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet: depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        stages, in_planes = [], widths[0]
        for i, w in enumerate(widths[1:]):
            blocks = []
            for j in range(n):
                blocks.append(WideBasicBlock(in_planes, w, (1 if i == 0 else 2) if j == 0 else 1, dropout))
                in_planes = w
            stages.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = stages
        self.bn = nn.BatchNorm2d(widths[-1])
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = F.relu(self.bn(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def resnet56(num_classes: int = 100) -> CifarResNet:
    """ResNet-56 for 32x32 input (0.85M parameters, 126M MACs at 32x32)."""
    return CifarResNet(56, num_classes)


def wrn28_10(num_classes: int = 100, dropout: float = 0.0) -> WideResNet:
    """Wide-ResNet-28-10 for 32x32 input (36.5M parameters, 5.25G MACs at 32x32)."""
    return WideResNet(28, 10, num_classes, dropout)
