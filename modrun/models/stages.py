"""The classifier head as one module, so that a model's forward can be split into stages (`stages()`), and the
embedding prefix that matryoshka sizes read."""

from __future__ import annotations

import torch
from torch import nn


class Head(nn.Module):
    """pool -> flatten -> (dropout) -> fc, sharing the model's own modules (built on demand by `stages()`,
    so the model's state-dict keys stay as they are)."""

    def __init__(self, pool: nn.Module, fc: nn.Module, dropout: nn.Module | None = None) -> None:
        super().__init__()
        self.pool, self.fc = pool, fc
        self.dropout = dropout if dropout is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(fit_embedding(torch.flatten(self.pool(x), 1), self.fc)))


def fit_embedding(x: torch.Tensor, fc: nn.Module) -> torch.Tensor:
    """The embedding's first `fc.in_features` channels: a matryoshka size cut out of a nested run
    (modrun/subnet.py) keeps a prefix of them. A no-op (and not traced) when the sizes agree."""
    n = getattr(fc, "in_features", x.shape[1])
    return x if x.shape[1] == n else x[:, :n]
