"""Unstructured pruning: a 0/1 mask per weight tensor, re-applied after every optimiser step.

Scores decide which weights go: magnitude |w|, random, or LAMP; `scope=global` ranks all targeted weights
together, `scope=layer` prunes every layer to the same sparsity. `gradual_magnitude` raises the sparsity
on Zhu & Gupta's cubic schedule while the model fine-tunes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modrun.core.errors import UserError
from modrun.methods.prune.context import PruneContext


def magnitude_scores(w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return w.detach().abs()


def random_scores(w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(w.shape, generator=gen).to(w.device)


def lamp_scores(w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """LAMP: w_u^2 divided by the sum of w_v^2 over the weights of its layer at least as large as w_u."""
    sq = w.detach().flatten().pow(2)
    order = sq.argsort()
    sorted_sq = sq[order]
    tail = sorted_sq.flip(0).cumsum(0).flip(0)  # sum over v >= u in ascending order
    scores = torch.empty_like(sq)
    scores[order] = sorted_sq / tail.clamp_min(1e-12)
    return scores.view_as(w)


def cubic_sparsity(step: int, s_i: float, s_f: float, t0: int, n: int, dt: int) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3 for t0 <= t <= t0 + n dt."""
    if step < t0:
        return s_i
    progress = min(1.0, (step - t0) / max(1, n * dt))
    return s_f + (s_i - s_f) * (1.0 - progress) ** 3


class MaskPruner:
    structured = False

    def __init__(
        self,
        targets: dict[str, nn.Module],
        score: Any,
        sparsity: float,
        scope: str,
        seed: int,
        schedule: dict | None = None,
    ) -> None:
        if not 0.0 <= sparsity < 1.0:
            raise UserError(f"prune.sparsity={sparsity}: must be in [0, 1)")
        if scope not in ("global", "layer"):
            raise UserError(f"prune.scope={scope}: expected global or layer")
        self.targets, self.score, self.sparsity, self.scope = targets, score, sparsity, scope
        self.gen = torch.Generator().manual_seed(seed)
        self.schedule = schedule
        self.masks = {name: torch.ones_like(m.weight, dtype=torch.bool) for name, m in targets.items()}
        self.current = 0.0

    def start(self, total_steps: int) -> None:
        """One-shot pruners prune now; gradual ones set up their schedule and prune at its steps."""
        if self.schedule is None:
            self.prune_to(self.sparsity)
            return
        s = self.schedule
        t0, t_end = int(s["start"] * total_steps), int(s["end"] * total_steps)
        self.t0, self.dt = t0, max(1, int(s["every"]))
        self.n = max(1, (t_end - t0) // self.dt)
        self.prune_to(cubic_sparsity(0, s["initial_sparsity"], self.sparsity, t0, self.n, self.dt))

    def after_step(self, step: int) -> None:
        if self.schedule is not None and step >= self.t0 and (step - self.t0) % self.dt == 0:
            if (step - self.t0) // self.dt <= self.n:
                s = self.schedule
                self.prune_to(cubic_sparsity(step, s["initial_sparsity"], self.sparsity, self.t0, self.n, self.dt))
        self.apply()

    @torch.no_grad()
    def prune_to(self, sparsity: float) -> None:
        """Masks that keep the highest-scoring (1 - sparsity) of the targeted weights (already pruned stay so)."""
        scores = {}
        for name, m in self.targets.items():
            s = self.score(m.weight, self.gen).float()
            scores[name] = torch.where(self.masks[name], s, torch.full_like(s, -1.0))  # pruned weights stay pruned
        if self.scope == "global":
            flat = torch.cat([s.flatten() for s in scores.values()])
            k = int(sparsity * flat.numel())
            threshold = flat.kthvalue(k).values if k > 0 else flat.min() - 1
            for name, s in scores.items():
                self.masks[name] = s > threshold
        else:
            for name, s in scores.items():
                k = int(sparsity * s.numel())
                threshold = s.flatten().kthvalue(k).values if k > 0 else s.min() - 1
                self.masks[name] = s > threshold
        self.current = sparsity
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        for name, m in self.targets.items():
            m.weight.mul_(self.masks[name])

    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {k: v.cpu() for k, v in self.masks.items()},
            "current": self.current,
            "gen": self.gen.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks = {k: v.to(self.targets[k].weight.device) for k, v in state["masks"].items()}
        self.current = state["current"]
        self.gen.set_state(state["gen"])
        self.apply()

    def layer_sparsity(self) -> dict[str, float]:
        return {name: 1.0 - mask.float().mean().item() for name, mask in self.masks.items()}


def magnitude(ctx: PruneContext, sparsity: float = 0.5, scope: str = "global") -> MaskPruner:
    """Prune the smallest |w| once."""
    return MaskPruner(ctx.targets, magnitude_scores, sparsity, scope, ctx.seed)


def random(ctx: PruneContext, sparsity: float = 0.5, scope: str = "layer") -> MaskPruner:
    """Prune uniformly at random once."""
    return MaskPruner(ctx.targets, random_scores, sparsity, scope, ctx.seed)


def lamp(ctx: PruneContext, sparsity: float = 0.5) -> MaskPruner:
    """LAMP scores, ranked globally: layer-adaptive sparsities without per-layer tuning."""
    return MaskPruner(ctx.targets, lamp_scores, sparsity, "global", ctx.seed)


def gradual_magnitude(
    ctx: PruneContext,
    sparsity: float = 0.8,
    initial_sparsity: float = 0.0,
    start: float = 0.0,
    end: float = 0.75,
    every: int = 50,
    scope: str = "global",
) -> MaskPruner:
    """Magnitude pruning every `every` steps from `start` to `end` (fractions of training), cubic schedule."""
    if not 0.0 <= start < end <= 1.0:
        raise UserError(f"prune.start={start} and prune.end={end}: need 0 <= start < end <= 1")
    if every < 1:  # pruning happens at the steps divisible by `every`
        raise UserError(f"prune.every={every}: must be >= 1")
    if 0.0 <= sparsity < 1.0 and not 0.0 <= initial_sparsity <= sparsity:  # (a bad sparsity: MaskPruner says)
        raise UserError(f"prune.initial_sparsity={initial_sparsity}: must be in [0, prune.sparsity={sparsity}]")
    schedule = {"start": start, "end": end, "every": every, "initial_sparsity": initial_sparsity}
    return MaskPruner(ctx.targets, magnitude_scores, sparsity, scope, ctx.seed, schedule)
