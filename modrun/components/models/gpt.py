"""`gpt`: a decoder-only transformer language model (GPT-2's layout: token and learned position embeddings,
pre-norm blocks with causal attention, a final LayerNorm, a head tied to the token embedding), or rotary
positions instead of learned ones (`pos: rotary`)."""

from __future__ import annotations

import torch
from torch import nn

from modrun.components.models.transformer import Block, TiedHead, init_weights

POSITIONS = ("learned", "rotary")


class GPT(nn.Module):
    """tokens (B, T) -> logits (B, T, vocab_size) for the next token at every position."""

    embedding_layer = "ln_f"  # the last hidden states, (B, T, n_embd): what feature KD on `embedding` reads
    depth_key = "n_layer"  # the config key that counts blocks (a sorted exit cut out is this model, shallower)

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        pos: str = "learned",
        tie_weights: bool = True,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if pos not in POSITIONS:
            raise ValueError(f"pos={pos}: expected one of {', '.join(POSITIONS)}")
        if min(vocab_size, block_size, n_layer, n_head, n_embd) < 1:
            raise ValueError("vocab_size, block_size, n_layer, n_head and n_embd must be positive")
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd) if pos == "learned" else None
        self.drop = nn.Dropout(dropout)
        rotary = block_size if pos == "rotary" else 0
        self.blocks = nn.ModuleList(Block(n_embd, n_head, mlp_ratio, dropout, True, rotary) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        # one matrix reads and writes tokens (weight tying), or a head of its own
        self.head = TiedHead(self.tok_emb) if tie_weights else nn.Linear(n_embd, vocab_size, bias=False)
        init_weights(self, n_layer)
        # per instance: the depth is an argument (module paths that feature KD and m2m stages refer to)
        self.feature_layers = tuple(f"blocks.{i}" for i in range(n_layer))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"a window of {t} tokens is longer than the model's block_size {self.block_size}")
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(t, device=idx.device))
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.readout(x)

    def readout(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and head on the hidden states (B, T, n_embd): what a sorted exit after any block reads
        (nested=exits), so the exits and the full model share one code path."""
        return self.head(self.ln_f(x))
