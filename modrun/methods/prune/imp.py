"""Iterative magnitude pruning with weight rewinding (Frankle & Carbin 2019; Frankle et al. 2020).

Round r trains with the current masks, then removes weights by global magnitude so that after `rounds`
rounds the sparsity reaches its target (the same fraction of the survivors each round), and rewinds the
surviving weights to their values at `rewind_step` of round 0 (0: the source model's weights). A last
round trains the final masks. Every round is a resumable phase (`checkpoints/imp_round<r>/`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from modrun.core import checkpoint
from modrun.core.collectives import is_main
from modrun.core.errors import UserError
from modrun.engine.phases import done_path, run_phase
from modrun.methods.prune.context import PruneContext
from modrun.methods.prune.unstructured import MaskPruner, magnitude_scores

log = logging.getLogger("modrun")


class IMPPruner(MaskPruner):
    def __init__(self, ctx: PruneContext, sparsity: float, rounds: int, rewind_step: int) -> None:
        if rounds < 1:
            raise UserError(f"prune.rounds={rounds}: must be >= 1")
        if rewind_step < 0:
            raise UserError(f"prune.rewind_step={rewind_step}: must be >= 0")
        super().__init__(ctx.targets, magnitude_scores, sparsity, "global", ctx.seed)
        self.model, self.rounds, self.rewind_step = ctx.model, rounds, rewind_step
        self.run_dir = ctx.run_dir
        self.rewind_path = ctx.run_dir / "checkpoints" / "imp_rewind.pt"
        self.round = 0
        self._rewind_state: dict[str, torch.Tensor] | None = None  # this session's; the file is for a resume

    def start(self, total_steps: int) -> None:
        if self.rewind_step == 0 and not self.rewind_path.exists():
            self._save_rewind_point()

    def after_step(self, step: int) -> None:
        if self.round == 0 and step == self.rewind_step and self.rewind_step > 0:
            self._save_rewind_point()
        self.apply()

    def _save_rewind_point(self) -> None:
        self._rewind_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if is_main():  # data-parallel: every process holds the same weights; rank 0 writes
            self.rewind_path.parent.mkdir(parents=True, exist_ok=True)
            checkpoint.save(self.rewind_path, self._rewind_state)

    def rewind(self) -> None:
        """Surviving weights back to the rewind point; pruned ones stay zero."""
        state = self._rewind_state
        if state is None:  # a resumed run: the point saved by the first session
            state = checkpoint.load(self.rewind_path, next(self.model.parameters()).device)
        self.model.load_state_dict(state)
        self.apply()

    def sparsity_after(self, r: int) -> float:
        return 1.0 - (1.0 - self.sparsity) ** ((r + 1) / self.rounds)


def imp(ctx: PruneContext, sparsity: float = 0.8, rounds: int = 3, rewind_step: int = 0) -> IMPPruner:
    """Train, prune, rewind; `rounds` times; then train the final masks."""
    return IMPPruner(ctx, sparsity, rounds, rewind_step)


def run_rounds(pruner: IMPPruner, train: Callable[[str], dict], seed: int, device: torch.device) -> dict:
    """Every round of IMP, skipping those a killed run already finished. Returns the last round's result."""
    history = []
    for r in range(pruner.rounds + 1):
        pruner.round = r
        phase = f"imp_round{r}"

        def restore(ckpt: dict) -> None:  # finished before a kill: its final weights and masks
            pruner.model.load_state_dict(ckpt["modules"]["model"])
            pruner.load_state_dict(ckpt["extra"]["pruner"])

        if not done_path(pruner.run_dir, phase).exists():
            log.info(f"IMP round {r}/{pruner.rounds}: training at sparsity {pruner.current:.3f}")
        result = run_phase(pruner.run_dir, phase, seed + r, lambda phase=phase: train(phase), restore, device)
        history.append({"round": r, "sparsity": pruner.current, **result["final"]})
        if r < pruner.rounds:
            pruner.prune_to(pruner.sparsity_after(r))
            pruner.rewind()
    return {**result, "imp_rounds": history}
