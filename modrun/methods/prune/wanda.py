"""Wanda (Sun et al. ICLR 2024, "A Simple and Effective Pruning Approach for Large Language Models").

A weight's score is |W_ij| * ||X_j||_2, its magnitude times the L2 norm of its input feature over every token
(or position) of `calib_batches` training batches; each output row keeps its highest-scoring (1 - sparsity)
weights, or with `n_m=[N, M]` at most N of every M consecutive inputs (2:4 for the sparse tensor cores of
recent GPUs). As in the paper, the blocks are pruned in order and each block's statistics come from
calibration inputs that already went through the pruned blocks before it; other layers outside the blocks are
pruned last, and the output head (a Linear outside the blocks whose outputs are the classes or the vocabulary)
is kept dense, as the paper keeps the embedding and the LM head. The masks are kept during recovery, as
magnitude pruning's are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch
from torch import nn

from modrun.core.errors import UserError
from modrun.methods.prune.context import PruneContext
from modrun.methods.prune.unstructured import MaskPruner, magnitude_scores


def row_masks(scores: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None) -> torch.Tensor:
    """Keep-masks of a (out, in) score matrix: per row the top (1 - sparsity), or N of every M inputs."""
    if n_m is not None:
        n, m = n_m
        groups = scores.reshape(scores.shape[0], -1, m)  # in_features divisible by M: checked at start
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
        return keep.reshape(scores.shape)
    drop = int(scores.shape[1] * sparsity)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if drop > 0:
        keep.scatter_(1, scores.topk(drop, dim=1, largest=False).indices, False)
    return keep


class WandaPruner(MaskPruner):
    def __init__(
        self,
        ctx: PruneContext,
        sparsity: float,
        n_m: tuple[int, int] | None,
        calibration: Callable[[], Iterable[torch.Tensor]] | None,
    ) -> None:
        super().__init__(ctx.targets, magnitude_scores, sparsity, "layer", ctx.seed)
        self.model, self.n_m, self.calibration = ctx.model, n_m, calibration
        self.blocks = [dict(ctx.model.named_modules())[b] for b in getattr(ctx.model, "feature_layers", ()) or ()]

    @torch.no_grad()
    def prune_to(self, sparsity: float) -> None:
        if self.calibration is None:
            raise UserError("prune=wanda needs calibration batches of the training data")
        names = {m: n for n, m in self.targets.items()}
        order = [[names[m] for m in block.modules() if m in names] for block in self.blocks]
        rest = [n for n in self.targets if not any(n in group for group in order)]
        for group in [*order, rest]:  # each block's inputs come through the blocks pruned before it
            if group:
                norms = self._input_norms(group)
                for name in group:
                    w = self.targets[name].weight
                    scores = w.abs().float().reshape(w.shape[0], -1) * norms[name]
                    self.masks[name] = row_masks(scores, sparsity, self.n_m).reshape(w.shape)
                self.apply()
        self.current = 1.0 - self.n_m[0] / self.n_m[1] if self.n_m else sparsity

    def _input_norms(self, group: list[str]) -> dict[str, torch.Tensor]:
        """||X_j||_2 of each input feature of the group's layers over every calibration token."""
        sums = {name: torch.zeros(self.targets[name].weight[0].numel(), device=self.targets[name].weight.device)
                for name in group}  # fmt: skip

        def hook(name: str) -> Callable:
            def record(module: nn.Module, inputs: tuple) -> None:
                x = inputs[0].detach().float()
                sums[name] += x.reshape(-1, x.shape[-1]).pow(2).sum(0)

            return record

        handles = [self.targets[n].register_forward_pre_hook(hook(n)) for n in group]
        was_training = self.model.training
        self.model.eval()
        try:
            for x in self.calibration():
                self.model(x)
        finally:
            for h in handles:
                h.remove()
            self.model.train(was_training)
        return {name: s.sqrt() for name, s in sums.items()}


def wanda(
    ctx: PruneContext, sparsity: float = 0.5, n_m: list[int] | None = None, calib_batches: int = 8
) -> WandaPruner:
    """Wanda: |weight| x input-activation norm, compared per output row; optional N:M masks."""
    if calib_batches < 1:
        raise UserError(f"prune.calib_batches={calib_batches}: must be >= 1")
    not_linear = [n for n, m in ctx.targets.items() if not isinstance(m, nn.Linear)]
    if not_linear:
        raise UserError(f"prune=wanda scores Linear layers by their input features; {not_linear[0]} is not one "
                        "(prune.types=[Linear])")  # fmt: skip
    pair = None
    if n_m is not None:
        if len(n_m) != 2 or not all(isinstance(v, int) for v in n_m) or not 0 < n_m[0] < n_m[1]:
            raise UserError(f"prune.n_m={list(n_m)}: expected [N, M] with 0 < N < M, e.g. [2, 4]")
        pair = (int(n_m[0]), int(n_m[1]))
    elif not 0.0 <= sparsity < 1.0:
        raise UserError(f"prune.sparsity={sparsity}: must be in [0, 1)")
    blocks = tuple(f"{b}." for b in getattr(ctx.model, "feature_layers", ()) or ())
    head = {n for n, m in ctx.targets.items() if not n.startswith(blocks) and m.out_features == ctx.num_classes}
    if head and len(head) == len(ctx.targets):
        raise UserError(f"prune=wanda: the only Linear layer chosen is the output head ({sorted(head)[0]}), which "
                        "Wanda keeps dense")  # fmt: skip
    ctx = dataclasses.replace(ctx, targets={n: m for n, m in ctx.targets.items() if n not in head})
    bad = [n for n, m in ctx.targets.items() if pair and m.in_features % pair[1]]
    if bad:
        raise UserError(f"prune.n_m={list(n_m)}: layer {bad[0]} has inputs not divisible by {pair[1]}")
    return WandaPruner(ctx, sparsity, pair, ctx.calibration(calib_batches) if ctx.calibration else None)
