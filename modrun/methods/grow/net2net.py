"""Function-preserving width growth: Net2WiderNet (Chen, Goodfellow & Shlens 2016, "Net2Net").

A layer with C output channels grows to C' >= C: channel j < C keeps its weights, each new channel copies a
randomly chosen old one (g(j), seeded). Copies compute the same activation (BatchNorm statistics and affine
parameters copied too), so the next layer divides its incoming weight for an old channel by the number of
its copies: the sum over copies equals the old weight, and the network computes the same function.

Residual connections add two tensors channel by channel, so both sides of every add must use the same
mapping: a ResNet has one mapping per stage (its residual stream, the stem's output for stage 1), and one of
its own for the inside of each block (conv1's output), which no add touches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modrun.components.models.cnn import SmallCNN
from modrun.components.models.resnet import CifarResNet

Layer = tuple[str, str | None, str | None]  # module path, mapping of its input channels, of its output channels


@dataclass
class Mapping:
    """New channel -> the old channel it copies, and its share of that channel's outgoing weight."""

    index: torch.Tensor
    share: torch.Tensor


def make_mapping(old: int, new: int, gen: torch.Generator, noise: float = 0.0) -> Mapping:
    if new < old:
        raise ValueError(f"net2wider cannot shrink a layer ({old} -> {new} channels)")
    index = torch.cat([torch.arange(old), torch.randint(old, (new - old,), generator=gen)])
    counts = torch.bincount(index, minlength=old).double()
    share = 1.0 / counts[index]
    if noise > 0:
        # unequal shares break the copies' symmetry; zero-mean within each group of copies, so they still add up to 1
        z = torch.randn(new, generator=gen, dtype=torch.float64) * noise
        mean = torch.zeros(old, dtype=torch.float64).index_add_(0, index, z) / counts
        share = share * (1 + z - mean[index])
    return Mapping(index, share)


def cnn_layers() -> list[Layer]:
    return [
        ("features.0.0", None, "c0"),
        ("features.0.1", None, "c0"),
        ("features.1.0", "c0", "c1"),
        ("features.1.1", None, "c1"),
        ("features.3.0", "c1", "c2"),  # features.2 is a max-pool: channel-wise, so c1 passes through it
        ("features.3.1", None, "c2"),
        ("fc", "c2", None),
    ]


def resnet_layers(model: CifarResNet) -> list[Layer]:
    layers: list[Layer] = [("stem.0", None, "s0"), ("stem.1", None, "s0")]
    for s, stage in enumerate(model.layers):
        for b, block in enumerate(stage):
            p, inp, out, mid = f"layers.{s}.{b}", f"s{s - 1 if b == 0 and s > 0 else s}", f"s{s}", f"s{s}.{b}"
            layers += [
                (f"{p}.conv1", inp, mid),
                (f"{p}.bn1", None, mid),
                (f"{p}.conv2", mid, out),
                (f"{p}.bn2", None, out),
            ]
            if not isinstance(block.shortcut, nn.Identity):
                layers += [(f"{p}.shortcut.0", inp, out), (f"{p}.shortcut.1", None, out)]
    return layers + [("fc", f"s{len(model.layers) - 1}", None)]


@torch.no_grad()
def widen_layer(old: nn.Module, new: nn.Module, inp: Mapping | None, out: Mapping | None) -> None:
    """Copy `old` into the wider `new`: output channels picked by `out`, inputs picked and shared by `inp`."""
    if isinstance(old, nn.BatchNorm2d):
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(new, name).copy_(getattr(old, name)[out.index])
        new.num_batches_tracked.copy_(old.num_batches_tracked)
        return
    w = old.weight.double()
    if inp is not None:  # dim 1 holds the input channels of both conv and linear weights
        shape = [1, -1] + [1] * (w.dim() - 2)
        w = w[:, inp.index] * inp.share.to(w.device).view(shape)
    if out is not None:
        w = w[out.index]
    new.weight.copy_(w.to(new.weight.dtype))
    if old.bias is not None:
        new.bias.copy_(old.bias if out is None else old.bias[out.index])


def net2wider(source: nn.Module, grown: nn.Module, grow_cfg: Any, seed: int) -> dict[str, Any]:
    """Fill `grown` (the same architecture, wider) from `source`, so that both compute the same function."""
    if isinstance(source, SmallCNN) and isinstance(grown, SmallCNN):
        layers = cnn_layers()
    elif isinstance(source, CifarResNet) and isinstance(grown, CifarResNet):
        layers = resnet_layers(source)
    else:
        raise TypeError("grow=net2wider works on cnn_small and the CIFAR ResNets")
    covered = {path for path, _, _ in layers}
    uncovered = {n for n, m in grown.named_modules() if n not in covered and any(m.parameters(recurse=False))}
    if uncovered:  # a layer the plan misses would keep its random init and break the function
        raise RuntimeError(f"net2wider: no mapping for {sorted(uncovered)}")
    gen = torch.Generator().manual_seed(seed)
    maps: dict[str, Mapping] = {}
    for path, inp, out in layers:
        old, new = source.get_submodule(path), grown.get_submodule(path)
        if out is not None and out not in maps:  # the first layer that writes a mapping's channels defines it
            size = (
                (old.num_features, new.num_features)
                if isinstance(old, nn.BatchNorm2d)
                else (old.weight.shape[0], new.weight.shape[0])
            )
            maps[out] = make_mapping(*size, gen, float(grow_cfg.get("noise", 0.0)))
        widen_layer(old, new, maps[inp] if inp else None, maps[out] if out else None)
    return {"channels": {k: [int(m.index.max()) + 1, len(m.index)] for k, m in maps.items()}}
