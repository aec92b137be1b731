"""`vit`: a vision transformer (Dosovitskiy et al. 2021) for small images: non-overlapping patches embedded by
one strided convolution, a class token, learned positions, pre-norm blocks, the class token's final state
classified by a linear head."""

from __future__ import annotations

import torch
from torch import nn

from modrun.components.models.stages import Head
from modrun.components.models.transformer import Block, init_weights


class ClassToken(nn.Module):
    """The class token's state, (B, dim): the embedding that the head (and feature KD on `embedding`) reads."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


class Embedding(nn.Module):
    """Patches -> tokens, class token prepended, learned positions added, dropout: (B, C, H, W) -> (B, tokens, dim).
    It holds the ViT's own modules and parameters (shared, built on demand by `stages()`), so that the model's
    state-dict keys stay as they are."""

    def __init__(self, vit: ViT) -> None:
        super().__init__()
        self.patch_embed, self.drop = vit.patch_embed, vit.drop
        self.cls_token, self.pos_embed = vit.cls_token, vit.pos_embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _tokens(self, x)


def _tokens(m: ViT | Embedding, x: torch.Tensor) -> torch.Tensor:
    """The token stream entering block 0: one code path for the forward and its first stage."""
    x = m.patch_embed(x).flatten(2).transpose(1, 2)  # (B, patches, dim)
    x = torch.cat((m.cls_token.expand(len(x), -1, -1), x), dim=1) + m.pos_embed
    return m.drop(x)


class ViT(nn.Module):
    embedding_layer = "pool"
    depth_key = "depth"  # the config key that counts blocks (a sorted exit cut out is this model, shallower)

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
        x = _tokens(self, x)
        for block in self.blocks:
            x = block(x)
        return self.readout(x)

    def readout(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm, class token and head on the token stream (B, tokens, dim): what a sorted exit after any
        block reads (nested=exits), so the exits and the full model share one code path."""
        return self.head(self.pool(self.norm(x)))

    def stages(self) -> list[nn.Module]:
        """The forward pass as consecutive stages (their composition is `forward`), for stitching: the embedding
        joins block 0, so that stage k ends with block k and every boundary is a block's (B, tokens, dim) output;
        the last stage is the readout (final norm, class token, head)."""
        first, *rest = self.blocks
        return [nn.Sequential(Embedding(self), first), *rest, Head(nn.Sequential(self.norm, self.pool), self.head)]
