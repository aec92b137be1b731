"""`vit`: a vision transformer (Dosovitskiy et al. 2021) for small images: non-overlapping patches embedded by
one strided convolution, a class token, learned positions, pre-norm blocks, the class token's final state
classified by a linear head."""

from __future__ import annotations

import torch
from torch import nn

from modrun.components.models.transformer import Block, init_weights


class ClassToken(nn.Module):
    """The class token's state, (B, dim): the embedding that the head (and feature KD on `embedding`) reads."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


class ViT(nn.Module):
    embedding_layer = "pool"

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        patch: int = 2,
        depth: int = 4,
        heads: int = 4,
        dim: int = 64,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if min(patch, depth, heads, dim) < 1:
            raise ValueError("patch, depth, heads and dim must be positive")
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch}")
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2 + 1, dim))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout, causal=False) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.pool = ClassToken()
        self.head = nn.Linear(dim, num_classes)
        init_weights(self, depth)
        self.feature_layers = tuple(f"blocks.{i}" for i in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, patches, dim)
        x = torch.cat((self.cls_token.expand(len(x), -1, -1), x), dim=1) + self.pos_embed
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.pool(self.norm(x)))
