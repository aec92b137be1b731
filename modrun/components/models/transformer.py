"""Transformer parts shared by `gpt` and `vit`: pre-norm blocks of multi-head attention (torch's fused
`scaled_dot_product_attention`, causal or not, optional rotary positions) and a GELU MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def rotary_tables(head_dim: int, length: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of RoFormer's rotation angles, (length, head_dim / 2) each."""
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (Su et al. 2021) of (B, heads, T, head_dim): each pair of features is turned
    by the angle of its position."""
    t = x.shape[-2]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    c, s = cos[:t].to(x.dtype), sin[:t].to(x.dtype)
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float, causal: bool, rotary_length: int = 0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"the width ({dim}) must be a multiple of the number of heads ({heads})")
        # heads x head_dim may be narrower than dim once whole heads are pruned (qkv and proj then shrink)
        self.heads, self.head_dim, self.causal, self.dropout = heads, dim // heads, causal, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.rotary = rotary_length > 0
        if self.rotary:
            if (dim // heads) % 2:
                raise ValueError(f"rotary positions need an even head width, not {dim // heads}")
            cos, sin = rotary_tables(dim // heads, rotary_length)
            self.register_buffer("cos", cos, persistent=False)  # derived, not learned: kept out of checkpoints
            self.register_buffer("sin", sin, persistent=False)

    def matmul_macs(self, x: torch.Tensor) -> int:
        """q @ k^T and weights @ v over all T x T pairs (the dense count; a causal kernel may skip half)."""
        b, t, _ = x.shape
        return 2 * b * t * t * self.heads * self.head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.rotary:
            q, k = rotate(q, self.cos, self.sin), rotate(k, self.cos, self.sin)
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.proj = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)): a pre-norm transformer block."""

    def __init__(
        self, dim: int, heads: int, mlp_ratio: float, dropout: float, causal: bool, rotary_length: int = 0
    ) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout, causal, rotary_length)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(mlp_ratio * dim), dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.mlp(self.ln2(x))


class TiedHead(nn.Module):
    """The output layer that reuses the token embedding's matrix (Press & Wolf 2017, as in GPT-2). It holds no
    parameter of its own, so the state dict has one copy of the matrix (safetensors refuses shared storage)."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self._embedding = [embedding]  # a plain list: not registered twice (deepcopy keeps the sharing)

    @property
    def weight(self) -> torch.Tensor:
        return self._embedding[0].weight

    def matmul_macs(self, x: torch.Tensor) -> int:
        return x.numel() // x.shape[-1] * self.weight.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def init_weights(model: nn.Module, n_layer: int) -> None:
    """GPT-2's initialisation: normal(0, 0.02) weights, zero biases, and the projections into the residual
    stream scaled by 1/sqrt(2 * n_layer) so that its variance does not grow with depth."""
    for name, p in model.named_parameters():
        if p.dim() < 2:
            if name.endswith("bias"):
                nn.init.zeros_(p)
            continue
        std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("attn.proj.weight", "mlp.proj.weight")) else 0.02
        nn.init.normal_(p, 0.0, std)
