"""CIFAR-style ResNets (He et al. 2016, section 4.2): 3 stages of 6n+2 layers, 16/32/64 channels x width.

Down-sampling shortcuts are 1x1 conv + BN (option B) so that structured pruning can follow the
dependency between a block's output and its shortcut. Stages are `layers.0`, `layers.1`, `layers.2`:
those are the module paths that feature distillation and module-to-module KD refer to.
"""

from __future__ import annotations

import torch
from torch import nn

from modrun.components.models.stages import Head
from modrun.core.errors import UserError


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    feature_layers = ("layers.0", "layers.1", "layers.2")
    embedding_layer = "pool"
    block_stages = "layers"  # nested depths drop the trailing blocks of each stage (modrun/nested.py)

    def __init__(self, depth: int, in_channels: int, num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        widths = [max(1, round(c * width)) for c in (16, 32, 64)]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        stages, cin = [], widths[0]
        for i, cout in enumerate(widths):
            blocks = [BasicBlock(cin if j == 0 else cout, cout, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))

    @staticmethod
    def depth_config(blocks: int) -> dict:
        """The model config of this family with `blocks` blocks per stage (a shallower nested size)."""
        return {"name": "resnet", "depth": 6 * blocks + 2}

    def stages(self) -> list[nn.Module]:
        """The forward pass as consecutive stages (their composition is `forward`), for stitching."""
        return [self.stem, *self.layers, Head(self.pool, self.fc)]


def resnet(in_channels: int, num_classes: int, depth: int = 20, width: float = 1.0) -> nn.Module:
    """Any depth 6n+2 (n blocks per stage): e.g. the resnet38 that `modrun grow grow=stack` makes of a resnet20."""
    if depth < 8 or (depth - 2) % 6 != 0:  # bad input, not a crash: found when the model is built
        raise UserError(f"model.depth={depth}: a CIFAR ResNet has depth 6n+2 with n >= 1 (8, 14, 20, 26, 32, 38, ...)")
    return CifarResNet(depth, in_channels, num_classes, width)


def resnet20(in_channels: int, num_classes: int, width: float = 1.0) -> nn.Module:
    return CifarResNet(20, in_channels, num_classes, width)


def resnet32(in_channels: int, num_classes: int, width: float = 1.0) -> nn.Module:
    return CifarResNet(32, in_channels, num_classes, width)


def resnet56(in_channels: int, num_classes: int, width: float = 1.0) -> nn.Module:
    return CifarResNet(56, in_channels, num_classes, width)


def resnet110(in_channels: int, num_classes: int, width: float = 1.0) -> nn.Module:
    return CifarResNet(110, in_channels, num_classes, width)
