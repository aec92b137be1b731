"""Nested sub-networks trained in one run (`nested` group): many deployable sizes from one set of weights.

`sorted` (SortedNet, Valipour et al. 2023; after slimmable networks, Yu et al. 2019): a sub-network of width
w keeps the leading ceil(w * C) channels of every layer with C channels, and one of depth d keeps the leading
max(1, round(d * n)) blocks of every residual stage of n blocks (models with such stages: the resnets). Training
masks the other channels at every BatchNorm output (so a narrower network sees exactly the activations its
sliced copy would) and swaps the dropped blocks for identities, and averages, per step, the losses of every
(width, depth) pair (`mode: sum`) or of the full model plus one pair drawn from a generator seeded by the
step (`mode: sample`, resumable). With the `kd` group (`kd=kd`, `kd=dkd`, `kd=[kd,dist]`: the logit methods),
the full model's detached logits teach every smaller size in place. modrun/subnet.py cuts a sub-network out as
a physically smaller model.

`matryoshka` (Matryoshka representation learning, Kusupati et al. 2022): the classifier is trained on nested
prefixes of the embedding (the input of the final linear layer): loss = mean over dims d of
CE(W[:, :d] x[:, :d] + b).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from modrun.core.errors import UserError
from modrun.core.registry import KD_METHODS
from modrun.engine.objectives import StepSeeded
from modrun.methods.distill import TERM_KEYS
from modrun.methods.distill.base import KDContext, Outputs, warmup_factor

Size = Any  # (width, depth) for nested=sorted, an embedding dim (int) for nested=matryoshka, an Exit for exits


@dataclass(frozen=True, order=True)
class Exit:
    """A sorted exit of nested=exits: the first `blocks` blocks, then the model's final norm and shared head."""

    blocks: int


def keep(channels: int, width: float) -> int:
    return max(1, math.ceil(width * channels - 1e-9))


def keep_blocks(blocks: int, depth: float) -> int:
    return max(1, math.floor(depth * blocks + 0.5))  # round half up: depth 0.5 of 3 blocks keeps 2


def block_stages(model: nn.Module) -> list[nn.Sequential]:
    """The residual stages whose trailing blocks a shallower sub-network drops (the model's `block_stages`
    attribute names their parent, e.g. `layers` of the CIFAR resnets); [] for models without them."""
    path = getattr(model, "block_stages", None)
    return list(model.get_submodule(path)) if path else []


@contextmanager
def slim(model: nn.Module, width: float, depth: float = 1.0) -> Iterator[None]:
    """Run `model` as its sub-network of `width` and `depth`: channels beyond the leading ones are zero after
    each BN, and blocks beyond the leading ones of each stage are identities (so they cost nothing). BatchNorm
    running statistics stay the full model's (momentum 0 meanwhile), so validation during training and the
    checkpoints measure the full model; a cut-out size gets its own (subnet.recalibrate)."""

    def mask(module: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        k = keep(out.shape[1], width)
        m = torch.zeros(out.shape[1], device=out.device, dtype=out.dtype)
        m[:k] = 1
        return out * m.view(1, -1, *([1] * (out.dim() - 2)))

    dropped, handles, momenta = [], [], []
    try:  # whatever happens, the model leaves as it came
        if width < 1.0 or depth < 1.0:
            momenta = [(m, m.momentum) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            for bn, _ in momenta:
                bn.momentum = 0.0
        for stage in block_stages(model) if depth < 1.0 else []:
            for i in range(keep_blocks(len(stage), depth), len(stage)):
                dropped.append((stage, i, stage[i]))
                stage[i] = nn.Identity()
        if width < 1.0:
            handles = [m.register_forward_hook(mask) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        yield
    finally:
        for h in handles:
            h.remove()
        for stage, i, block in dropped:
            stage[i] = block
        for bn, momentum in momenta:
            bn.momentum = momentum


def inplace_terms(
    kd: DictConfig | None, num_classes: int, num_samples: int
) -> dict[str, tuple[float, float, nn.Module]]:
    """The kd group's terms as (weight, warm-up epochs, method), each method a loss over (sub-size, full) logits."""

    terms = {}
    for key, node in ((kd or {}).get("terms") or {}).items():
        args = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in TERM_KEYS}
        method = KD_METHODS.get(node.get("name", key))(KDContext([], [], num_classes, num_samples), **args)
        terms[str(key)] = (float(node.weight), float(node.get("warmup_epochs") or 0), method)
    return terms


def classifier(model: nn.Module) -> nn.Linear:
    fc = getattr(model, "fc", None)
    if not isinstance(fc, nn.Linear):
        raise UserError("nested=matryoshka needs a model whose classifier is a linear layer named `fc`")
    return fc


def depths(node: DictConfig) -> list[float]:
    wanted = node.get("depths")
    return sorted({float(d) for d in (wanted if wanted is not None else [1.0])} | {1.0})


def exits(node: DictConfig, depth: int) -> list[Exit]:
    """The exits of nested=exits on a model of `depth` blocks: the listed block counts (null: every one) and
    always the full depth, shallowest first."""
    wanted = node.get("exits")
    counts = range(1, depth + 1) if wanted is None else [int(n) for n in wanted]
    return [Exit(n) for n in sorted(set(counts) | {depth})]


def sizes(node: DictConfig, depth: int | None = None) -> list[Size]:
    """The sizes a nested run offers: (width, depth) pairs in order (sorted), dims, smallest first (matryoshka),
    or exits (which need the model's `depth` in blocks)."""
    if node.name == "sorted":  # the full model is always one of them
        widths = sorted({float(w) for w in node.widths} | {1.0})
        return sorted((w, d) for w in widths for d in depths(node))
    if node.name == "exits":
        if depth is None:
            raise ValueError("the exits of nested=exits depend on the model's depth")
        return exits(node, depth)
    return sorted({int(d) for d in node.dims})


def size_name(size: Size) -> str:
    """`w0.5` / `w0.5_d0.67` / `d16` / `e2`: the size in metric names and folder names."""
    if isinstance(size, Exit):
        return f"e{size.blocks}"
    if isinstance(size, tuple):
        return f"w{size[0]:g}" + (f"_d{size[1]:g}" if size[1] < 1.0 else "")
    return f"d{size}"


class NestedObjective(StepSeeded):
    """The loss over every size of a nested run; the logits reported are the full model's."""

    def __init__(self, model: nn.Module, node: DictConfig, seed: int, kd: dict | None = None) -> None:
        super().__init__(model)
        self.node, self.seed, self.step = node, seed, 0
        self.sizes = sizes(node)
        self.kd = kd or {}  # from inplace_terms()
        self.epoch = 0

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def loss(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        if self.node.name == "matryoshka":
            return self._matryoshka(x, y)
        pairs = self.sizes[::-1]  # the full model first: its logits teach the others
        if self.node.mode == "sample" and len(pairs) > 2:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.step)  # resumable: a function of the step
            pairs = [pairs[0], pairs[1 + int(torch.randint(len(pairs) - 1, (1,), generator=gen))]]
        full, total, terms = None, 0.0, {}
        for w, d in pairs:
            with slim(self.model, w, d):
                logits = self.model(x)
            loss = F.cross_entropy(logits, y)
            terms[f"ce_{size_name((w, d))}"] = loss.detach()
            if full is not None:  # a smaller size: the full model's logits teach it
                teacher = Outputs(full.detach())
                for key, (weight, warmup, method) in self.kd.items():
                    kd = method(Outputs(logits), teacher, y, idx)
                    terms[f"{key}_{size_name((w, d))}"] = kd.detach()
                    loss = loss + weight * warmup_factor(self.epoch, warmup) * kd
            full = logits if full is None else full
            total = total + loss
        return total / len(pairs), full, terms

    def _matryoshka(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        fc, feats = classifier(self.model), {}
        handle = fc.register_forward_pre_hook(lambda m, inputs: feats.update(x=inputs[0]))
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        total, terms = 0.0, {}
        for d in self.sizes:
            ce = F.cross_entropy(prefix_logits(fc, feats["x"], d), y)
            terms[f"ce_d{d}"] = ce.detach()
            total = total + ce
        return total / len(self.sizes), logits, terms


def prefix_logits(fc: nn.Linear, x: torch.Tensor, d: int) -> torch.Tensor:
    return F.linear(x[:, :d], fc.weight[:, :d], fc.bias)
