"""Sorted exits (`nested=exits`; Sorted LLaMA, Kavehzadeh et al. 2024, which is SortedNet's depth axis): one
transformer trained so that its first n blocks, followed by the model's own final norm and shared head, are a
model of their own for every listed n.

Each step runs the full model once; the hidden states after block n-1 of every shallower exit are caught on the
way (forward hooks) and read out by the model's `readout` (gpt: final LayerNorm + tied head; vit: norm, class
token, head), the code path of the full model's own output. The loss is the mean over exits of the task's
cross-entropy (per token for language models); with the `kd` group the full model's detached logits teach every
shallower exit in place (`kd=kd`, `kd=dkd`, ...), as nested widths do. `mode: sample` trains the full model
and one exit drawn per step from a generator seeded by the step (resumable). An exit cut out
(`modrun eval RUN nested.exit=n`) is the model with its trailing blocks deleted: exactly the exit's logits.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from modrun.core.errors import UserError
from modrun.engine.objectives import StepSeeded
from modrun.methods.distill.base import Outputs, warmup_factor
from modrun.methods.nested.base import Exit, exits, size_name


def exit_blocks(model: nn.Module, name: str = "model") -> nn.ModuleList:
    """The blocks an exit counts; a model without `blocks` and a `readout` for hidden states cannot exit early."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not callable(getattr(model, "readout", None)):
        raise UserError(
            f"nested=exits: model {name} has no `blocks` list with a `readout` of its hidden states; use gpt or vit"
        )
    return blocks


def _items(logits: torch.Tensor) -> torch.Tensor:
    return logits.reshape(-1, logits.shape[-1])  # one prediction per image, or per token of a window


class ExitsObjective(StepSeeded):
    """The mean loss over the exits of one forward pass; the logits reported are the full model's."""

    def __init__(self, model: nn.Module, node: DictConfig, seed: int, kd: dict | None = None) -> None:
        super().__init__(model)
        self.node, self.seed, self.step, self.epoch = node, seed, 0, 0
        self.blocks = exit_blocks(model)
        self.exits = [e.blocks for e in exits(node, len(self.blocks))][::-1]  # deepest (the full model) first
        self.kd = kd or {}  # from base.inplace_terms()

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def loss(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        chosen = self.exits
        if self.node.mode == "sample" and len(chosen) > 2:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.step)  # resumable: a function of the step
            chosen = [chosen[0], chosen[1 + int(torch.randint(len(chosen) - 1, (1,), generator=gen))]]
        hidden: dict[int, torch.Tensor] = {}
        hooks = [
            self.blocks[n - 1].register_forward_hook(lambda m, i, o, n=n: hidden.__setitem__(n, o)) for n in chosen[1:]
        ]
        try:
            full = self.model(x)
        finally:
            for h in hooks:
                h.remove()
        target, teacher = y.reshape(-1), Outputs(_items(full).detach())
        total, terms = 0.0, {}
        for n in chosen:
            logits = full if n == chosen[0] else self.model.readout(hidden[n])
            loss = F.cross_entropy(_items(logits), target)
            name = size_name(Exit(n))
            terms[f"ce_{name}"] = loss.detach()
            if n != chosen[0]:
                for key, (weight, warmup, method) in self.kd.items():
                    kd = method(Outputs(_items(logits)), teacher, target, idx)
                    terms[f"{key}_{name}"] = kd.detach()
                    loss = loss + weight * warmup_factor(self.epoch, warmup) * kd
            total = total + loss
        return total / len(chosen), full, terms


def cut_exit(model: nn.Module, blocks: int) -> nn.Module:
    """The model of one exit: a copy with every block from `blocks` on deleted (the head stays shared with the
    embedding where it was tied: deepcopy keeps the alias)."""
    small = copy.deepcopy(model)
    del exit_blocks(small)[blocks:]
    if hasattr(small, "feature_layers"):
        small.feature_layers = tuple(small.feature_layers)[:blocks]
    return small
