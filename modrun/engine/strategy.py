"""How the loop runs an objective's forward and backward across processes, and with gradient accumulation.

One process: the objective's loss is called as it is. Several (`trainer.devices` x `trainer.nodes` > 1):
torch's `DistributedDataParallel` wraps the trained modules, so gradients are averaged by its bucketed
all-reduce, overlapped with the backward pass, and buffers (BatchNorm statistics) come from rank 0 at every
forward. `trainer.accumulate_grad_batches=K` sums the gradients of K batches before each optimiser step;
the K-1 batches before the last skip DDP's all-reduce (`no_sync`), as every DDP user does.
`trainer.strategy=fsdp` shards the model instead (FSDP2, modrun/engine/sharding.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from modrun.components.data.base import num_batches
from modrun.core import collectives as ddp
from modrun.core.errors import UserError
from modrun.engine.sharding import Sharded


class _Trained(nn.Module):
    """The objective's trained modules as one module whose forward is the objective's loss (what DDP wraps)."""

    def __init__(self, objective: Any) -> None:
        super().__init__()
        self.objective = [objective]  # a list: not a submodule (the objective is no nn.Module)
        self.parts = nn.ModuleDict(objective.modules())

    def forward(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> tuple:
        return self.objective[0].loss(x, y, idx)


class Strategy:
    """The per-batch forward and backward of a run; `accumulate` batches per optimiser step."""

    def __init__(self, trainer: DictConfig, objective: Any) -> None:
        self.accumulate = int(trainer.get("accumulate_grad_batches", 1) or 1)
        self.find_unused = bool(trainer.get("find_unused_parameters", False)) or objective.varying_graph
        self.fsdp = ddp.world_size() > 1 and trainer.get("strategy", "ddp") == "fsdp"
        self.objective, self.wrapped, self.checked = objective, None, False
        self.sharded: Sharded | None = None

    def start(self) -> None:
        """Wrap the trained modules for data-parallel training, before the optimiser takes their parameters and
        after a resumed run loaded its weights (DDP broadcasts rank 0's parameters and buffers when it is built;
        FSDP shards what every process loaded or built alike)."""
        if self.fsdp:
            self.sharded = Sharded(self.objective.modules())
        elif ddp.world_size() > 1:
            trained = _Trained(self.objective)
            device = next(trained.parameters()).device
            self.wrapped = DistributedDataParallel(
                trained,
                device_ids=[device] if device.type == "cuda" else None,
                find_unused_parameters=self.find_unused,
            )

    def loss(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> tuple:
        return self.wrapped(x, y, idx) if self.wrapped is not None else self.objective.loss(x, y, idx)

    @contextlib.contextmanager
    def sync(self, last_of_step: bool) -> Iterator[None]:
        """Around a batch's forward and backward: the gradient all-reduce happens on the step's last batch only."""
        if self.sharded is not None:
            self.sharded.sync(last_of_step)
            yield
        elif self.wrapped is None or last_of_step:
            yield
        else:
            with self.wrapped.no_sync():
                yield

    def after_backward(self) -> None:
        """After a step's last backward: FSDP's replicated modules' gradients averaged; DDP's checked."""
        if self.sharded is not None:
            self.sharded.average_replicated()
        else:
            self.check_gradients()

    def clip_gradients(self, params: list[nn.Parameter], max_norm: float) -> None:
        if self.sharded is not None:
            self.sharded.clip_gradients(max_norm)  # the norm over shards and replicas together
        else:
            nn.utils.clip_grad_norm_(params, max_norm)

    def check_gradients(self) -> None:
        """After the first synchronised backward: a trained parameter that got no gradient would stall DDP's
        reducer at the next step; name it and the switch that handles it."""
        if self.checked or self.wrapped is None:
            return
        self.checked = True
        if self.find_unused:
            return
        missing = [n for n, p in self.wrapped.module.named_parameters() if p.requires_grad and p.grad is None]
        if missing:
            names = ", ".join(n.removeprefix("parts.") for n in missing[:3]) + (" ..." if len(missing) > 3 else "")
            raise UserError(
                f"{len(missing)} trained parameter(s) got no gradient ({names}): a data-parallel run needs "
                "trainer.find_unused_parameters=true for this model (or freeze them)"
            )

    def sync_buffers(self) -> None:
        """Rank 0's buffers in every process (before an evaluation, where each process evaluates its share of the
        split, and before a save, whose finiteness check must then agree on every process)."""
        if self.wrapped is not None or self.sharded is not None:  # FSDP keeps buffers whole in every process
            ddp.broadcast_state(self.objective.modules().values())

    @property
    def evaluates_everywhere(self) -> bool:
        """Whether every process evaluates the whole split: a sharded model's forward is a collective, so the
        processes must run the same batches in lock step."""
        return self.sharded is not None

    def finite(self) -> bool:
        """Whether every floating-point weight and buffer is finite (the same answer in every process)."""
        if self.sharded is not None:
            return self.sharded.finite()
        return all(
            torch.isfinite(v).all()
            for m in self.objective.modules().values()
            for v in m.state_dict().values()
            if v.is_floating_point()
        )

    def state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """The trained modules' whole state dicts, for a checkpoint (collective under FSDP; rank 0 saves them)."""
        if self.sharded is not None:
            return self.sharded.state_dicts()
        return {k: m.state_dict() for k, m in self.objective.modules().items()}

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return self.sharded.optimizer_state(optimizer) if self.sharded is not None else optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        if self.sharded is not None:
            self.sharded.load_optimizer_state(optimizer, state)
        else:
            optimizer.load_state_dict(state)

    def finish(self) -> None:
        """After training: the recipe gets plain modules back (saving, cost report, a next phase)."""
        if self.sharded is not None:
            self.sharded.release()
            self.sharded = None


def epoch_length(trainer: DictConfig, train_size: int, batch_size: int) -> tuple[int, int]:
    """Batches and optimiser steps in one epoch of this process: its share of the train split, in batches of
    `batch_size`, `accumulate_grad_batches` of them per step (what schedules such as gradual pruning count)."""
    batches = num_batches(-(-train_size // ddp.world_size()), batch_size, drop_last=bool(trainer.drop_last))
    return batches, -(-batches // int(trainer.get("accumulate_grad_batches", 1) or 1))


def group_sizes(batches: int, accumulate: int) -> Callable[[int], tuple[bool, int]]:
    """For batch b of an epoch of `batches`: whether it ends an optimiser step, and how many batches that step
    has (the last step of an epoch takes what is left). Each batch's loss is divided by that size, so a step's
    gradient is the mean over its batches, as one large batch would give."""

    def at(b: int) -> tuple[bool, int]:
        first = b - b % accumulate
        size = min(accumulate, batches - first)
        return b + 1 == first + size, size

    return at
