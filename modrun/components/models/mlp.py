"""Multilayer perceptron over flattened images."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def mlp(
    in_channels: int, image_size: int, num_classes: int, hidden: Sequence[int] = (256, 128), dropout: float = 0.0
) -> nn.Module:
    """Flatten -> [Linear -> ReLU -> Dropout] * len(hidden) -> Linear."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_channels * image_size * image_size
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = int(h)
    layers.append(nn.Linear(width, num_classes))
    model = nn.Sequential(*layers)
    relus = [str(i) for i, m in enumerate(layers) if isinstance(m, nn.ReLU)]
    # roles for distillation: hidden activations are its features, the last one its embedding
    model.feature_layers = tuple(relus)
    model.embedding_layer = relus[-1] if relus else "0"
    return model
