"""Optimizers and per-step learning-rate schedules (registries `optimizers`, `schedulers`).

torch is imported inside the factories so that declaring them costs nothing at start-up.
"""

from __future__ import annotations

# imports inside functions here defer torch: validation reads the optimiser table without loading torch
import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from modrun.core.registry import OPTIMIZERS, SCHEDULERS

if TYPE_CHECKING:
    import torch

OPTIMIZERS.lazy("sgd", "modrun.components.optim:sgd", "SGD with momentum, optional Nesterov, L2 weight decay")
OPTIMIZERS.lazy("adamw", "modrun.components.optim:adamw", "AdamW (decoupled weight decay)")
SCHEDULERS.lazy(
    "cosine", "modrun.components.optim:cosine", "linear warm-up then cosine decay to min_lr_ratio x lr, per step"
)
SCHEDULERS.lazy("step", "modrun.components.optim:step", "multiply lr by gamma at fractions of training (milestones)")
SCHEDULERS.lazy("none", "modrun.components.optim:constant", "constant learning rate")


def sgd(
    params: Iterable, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4, nesterov: bool = True
) -> torch.optim.Optimizer:
    import torch

    return torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov and momentum > 0
    )


def adamw(
    params: Iterable,
    lr: float = 1e-3,
    betas: Sequence[float] = (0.9, 0.999),
    weight_decay: float = 0.01,
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    import torch

    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps)


def _lambda(optimizer: torch.optim.Optimizer, factor: Callable[[int], float]) -> torch.optim.lr_scheduler.LRScheduler:
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    steps_per_epoch: int,
    warmup_epochs: float = 0.0,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LRScheduler:
    warmup = int(round(warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return _lambda(optimizer, factor)


def step(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    steps_per_epoch: int,
    milestones: Sequence[float] = (0.5, 0.75),
    gamma: float = 0.1,
) -> torch.optim.lr_scheduler.LRScheduler:
    at = sorted(int(m * total_steps) for m in milestones)
    return _lambda(optimizer, lambda s: gamma ** sum(s >= a for a in at))


def constant(
    optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    return _lambda(optimizer, lambda s: 1.0)
