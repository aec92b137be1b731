"""Structured channel pruning through Torch-Pruning's dependency graph: coupled layers (a conv, its BN,
the next conv's inputs, residual partners) lose the same channels, and the result is a dense, smaller model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modrun.components.models.stages import PrefixLinear
from modrun.core.errors import UserError
from modrun.methods.prune.context import PruneContext

IMPORTANCE = ("l1", "l2", "group_l2", "random")


class ChannelPruner:
    structured = True

    def __init__(self, ctx: PruneContext, ratio: float, importance: str, global_pruning: bool) -> None:
        self.model, self.targets, self.ratio, self.num_classes = ctx.model, ctx.targets, ratio, ctx.num_classes
        self.importance, self.global_pruning, self.example = importance, global_pruning, ctx.example

    def start(self, total_steps: int) -> None:
        """Remove the channels now (once); training afterwards recovers accuracy."""
        try:
            import torch_pruning as tp
        except ImportError:  # pragma: no cover - it is a dependency, but say what to do if it went missing
            raise UserError("prune=channel needs Torch-Pruning: pip install torch-pruning") from None
        if any(isinstance(m, PrefixLinear) for m in self.model.modules()):  # its input slice is invisible to the graph
            raise UserError("prune=channel: this model reads a prefix of its embedding (a matryoshka cut-out)")
        importance = {
            "l1": lambda: tp.importance.MagnitudeImportance(p=1, group_reduction="first"),
            "l2": lambda: tp.importance.MagnitudeImportance(p=2, group_reduction="first"),
            "group_l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
            "random": lambda: tp.importance.RandomImportance(),
        }[self.importance]()
        targeted = {id(m) for m in self.targets.values()}

        def keep(m: nn.Module) -> bool:  # not targeted, or the classifier: its outputs are the classes
            return id(m) not in targeted or (isinstance(m, nn.Linear) and m.out_features == self.num_classes)

        ignored = [m for m in self.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and keep(m)]
        pruner = tp.pruner.MetaPruner(
            self.model,
            self.example,
            importance=importance,
            pruning_ratio=self.ratio,
            ignored_layers=ignored,
            global_pruning=self.global_pruning,
        )
        pruner.step()

    def after_step(self, step: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def layer_sparsity(self) -> dict[str, float]:
        return {}


def channel(
    ctx: PruneContext, ratio: float = 0.5, importance: str = "l1", global_pruning: bool = False
) -> ChannelPruner:
    """Remove `ratio` of the output channels of every targeted layer (or globally), by weight importance."""
    if not 0.0 < ratio < 1.0:
        raise UserError(f"prune.ratio={ratio}: must be in (0, 1)")
    if importance not in IMPORTANCE:
        raise UserError(f"prune.importance={importance}: expected one of {', '.join(IMPORTANCE)}")
    if importance == "random":
        torch.manual_seed(ctx.seed)
    return ChannelPruner(ctx, ratio, importance, global_pruning)
