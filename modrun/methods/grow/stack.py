"""Depth growth by stacking trained blocks (G_stack, Du et al. 2024; progressive stacking, Gong et al. 2019).

Each stage of a CIFAR ResNet with n blocks b0..b{n-1} becomes a stage of n x factor blocks, filled with
copies of the trained ones in one of two orders:

- `repeat` (default): b0 b1 b2 b0 b1 b2. The stage's whole sequence runs again on its own output, which is
  what G_stack does with a whole transformer (layer L+i copies layer i) and what Gong et al. found works:
  residual blocks refine a representation step by step, and a second pass repeats a refinement the stage
  already knows, in the order it learned it.
- `interleave`: b0 b0 b1 b1 b2 b2. Each block's update is applied twice in a row.

A transformer (`gpt`, `vit`) is one stage: its n blocks become n x factor, block i copying source block
i mod n (`repeat`, G_stack's order) or i // factor (`interleave`); embeddings, final norm and head are copied.
Every block keeps the stream's width, so no identity blocks are needed.

A ResNet stage's first block may change the shape (stride 2 and a projection shortcut in stages 2 and 3); its
copies further down the stage take a cout -> cout input and cannot hold its weights. They start as identity
blocks instead: fresh convolutions with the last BatchNorm's scale and shift at 0, so the residual branch
adds nothing (Goyal et al. 2017's zero-gamma init) and the block passes its non-negative input through.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modrun.components.models.resnet import BasicBlock, CifarResNet


def plan(blocks: int, factor: int, order: str) -> list[int]:
    """For each block of a grown stage, the index of the source block it copies."""
    if order == "repeat":
        return [k % blocks for k in range(blocks * factor)]
    if order == "interleave":
        return [k // factor for k in range(blocks * factor)]
    raise ValueError(f"grow.order={order}: expected repeat or interleave")


def changes_shape(block: BasicBlock) -> bool:
    return not isinstance(block.shortcut, nn.Identity) or block.conv1.stride != (1, 1)


@torch.no_grad()
def make_identity(block: BasicBlock) -> None:
    """The residual branch outputs 0, so block(x) = relu(x) = x for the post-ReLU inputs it gets."""
    block.bn2.weight.zero_()
    block.bn2.bias.zero_()


@torch.no_grad()
def stack(source: nn.Module, grown: nn.Module, grow_cfg: Any, seed: int) -> dict[str, Any]:
    """Fill `grown` (the deeper ResNet) from `source`; return which source block each grown block copies.

    `seed` is unused: the only random weights are the fresh identity blocks', drawn when `grown` was built."""
    if isinstance(getattr(source, "blocks", None), nn.ModuleList) and isinstance(
        getattr(grown, "blocks", None), nn.ModuleList
    ):
        return stack_transformer(source, grown, grow_cfg)
    if not isinstance(source, CifarResNet) or not isinstance(grown, CifarResNet):
        raise TypeError("grow=stack works on CIFAR ResNets (modrun/models/resnet.py) and on gpt / vit")
    grown.stem.load_state_dict(source.stem.state_dict())
    grown.fc.load_state_dict(source.fc.state_dict())
    copies: dict[str, str] = {}
    for s, (old, new) in enumerate(zip(source.layers, grown.layers, strict=True)):
        for pos, i in enumerate(plan(len(old), int(grow_cfg.factor), str(grow_cfg.order))):
            if pos > 0 and changes_shape(old[i]):
                make_identity(new[pos])
                copies[f"layers.{s}.{pos}"] = "identity"
            else:
                new[pos].load_state_dict(old[i].state_dict())
                copies[f"layers.{s}.{pos}"] = f"layers.{s}.{i}"
    return {"copies": copies}


@torch.no_grad()
def stack_transformer(source: nn.Module, grown: nn.Module, grow_cfg: Any) -> dict[str, Any]:
    """Everything outside the blocks copied as it is; grown block k a copy of source block plan[k]."""
    outside = {k: v for k, v in source.state_dict().items() if not k.startswith("blocks.")}
    missing, unexpected = grown.load_state_dict(outside, strict=False)
    if unexpected or any(not k.startswith("blocks.") for k in missing):
        raise TypeError(f"grow=stack: the grown model differs outside its blocks ({[*unexpected, *missing][:3]})")
    copies: dict[str, str] = {}
    for pos, i in enumerate(plan(len(source.blocks), len(grown.blocks) // len(source.blocks), str(grow_cfg.order))):
        grown.blocks[pos].load_state_dict(source.blocks[i].state_dict())
        copies[f"blocks.{pos}"] = f"blocks.{i}"
    return {"copies": copies}
