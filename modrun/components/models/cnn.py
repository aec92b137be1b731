"""A small CNN sized for 8x8 digits (works on any image size thanks to global pooling)."""

from __future__ import annotations

import torch
from torch import nn

from modrun.components.models.stages import Head


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """conv(w) -> conv(2w) -> maxpool -> conv(4w) -> global avg pool -> dropout -> linear."""

    # module paths that distillation refers to by role (`last`, `all`, `embedding` in kd configs)
    feature_layers = ("features.0", "features.1", "features.3")
    embedding_layer = "pool"
    # the layers that make the embedding channel for channel: a matryoshka size cuts them too
    embedding_producers = ("features.3.0", "features.3.1")

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(in_channels, width),
            _conv_bn(width, 2 * width),
            nn.MaxPool2d(2),
            _conv_bn(2 * width, 4 * width),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(self.pool(self.features(x)), 1)))

    def stages(self) -> list[nn.Module]:
        """The forward pass as consecutive stages (their composition is `forward`), for stitching. The max pool
        joins the conv after it, so every boundary is a conv block's output."""
        f = self.features
        return [f[0], f[1], nn.Sequential(f[2], f[3]), Head(self.pool, self.fc, self.dropout)]


def cnn_small(in_channels: int, num_classes: int, width: int = 32, dropout: float = 0.0) -> nn.Module:
    return SmallCNN(in_channels, num_classes, width, dropout)
