"""The classifier head as one module, so that a model's forward can be split into stages (`stages()`), and the
classifier of a matryoshka size, which reads a prefix of the embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Head(nn.Module):
    """pool -> flatten -> (dropout) -> fc, sharing the model's own modules (built on demand by `stages()`,
    so the model's state-dict keys stay as they are)."""

    def __init__(self, pool: nn.Module, fc: nn.Module, dropout: nn.Module | None = None) -> None:
        super().__init__()
        self.pool, self.fc = pool, fc
        self.dropout = dropout if dropout is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(self.pool(x), 1)))


class PrefixLinear(nn.Linear):
    """A linear layer that reads the first `in_features` features of a wider input: the classifier of a
    matryoshka size cut out of a nested run (modrun/subnet.py), whatever the model's forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x[:, : self.in_features], self.weight, self.bias)


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a block or sublayer was called with: first positional, or `hidden_states=` (HF)."""
    return args[0] if args else kwargs["hidden_states"]


class Passthrough(nn.Module):
    """A removed block (depth pruning): hands its input hidden states on, whatever else it is called with."""

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        return _hidden(args, kwargs)


class ZeroBranch(nn.Module):
    """A removed residual branch (an attention or MLP sublayer): adds nothing to the stream. `pair`: the branch
    returned (output, attention weights), as Hugging Face attention modules do."""

    def __init__(self, pair: bool = False) -> None:
        super().__init__()
        self.pair = pair

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor | tuple:
        zeros = torch.zeros_like(_hidden(args, kwargs))
        return (zeros, None) if self.pair else zeros
