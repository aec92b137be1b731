"""Fully sharded data-parallel training (`trainer.strategy=fsdp`) with torch's FSDP2 `fully_shard`.

The trained model is sharded over the processes: every block of its `nn.ModuleList`s (transformer layers)
is one FSDP unit, the rest of the model (embeddings, head, norms) another, so a process holds 1/world of the
weights, gradients and optimiser state and gathers one block at a time for its forward and backward. The
objective's other trained modules (KD adapters: small, and called outside the model's forward, where FSDP's
hooks would not gather them) stay whole in every process; their gradients are averaged by one all-reduce.
Checkpoints hold full (unsharded) state dicts gathered through `torch.distributed.checkpoint.state_dict`, in
the same layout as a single-process run's, so `modrun eval`, `source.run` and `teacher.run` read them as any
other. When training ends the modules are handed back unsharded (`Sharded.release`): the recipe saves,
measures and evaluates plain modules, as after any other run.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.distributed import _composable_state
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from modrun.core import collectives as ddp

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 gets the whole tensors, on the CPU
_EVERYWHERE = StateDictOptions(full_state_dict=True)  # every process gets them (to hand plain modules back)


class Sharded:
    """The trained modules of one `fit`: `model` sharded in place until `release`, the others replicated."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.all = modules
        self.model = modules["model"]
        self.replicated = [p for k, m in modules.items() if k != "model" for p in m.parameters() if p.requires_grad]
        # what fully_shard changes on a module is its class and its attributes; a shallow copy of both (the dicts
        # of parameters, buffers and hooks copied too) is what `release` puts back
        model = self.model
        self.device = next(model.parameters()).device
        self.saved = [
            (m, m.__class__, {k: copy.copy(v) if isinstance(v, dict) else v for k, v in m.__dict__.items()})
            for m in model.modules()
        ]
        whole = list(model.parameters())
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
        for m in reversed(lists):  # bottom-up, as fully_shard wants: inner blocks before the blocks holding them
            for block in m:
                if any(p.requires_grad for p in block.parameters()):
                    fully_shard(block)
        fully_shard(model)
        for p in whole:  # the shards are copies: free the whole tensors (memory is what sharding is for)
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    def sync(self, last_of_step: bool) -> None:
        """Reduce-scatter the gradients only on the last batch of an optimiser step (accumulation)."""
        self.model.set_requires_gradient_sync(last_of_step)  # type: ignore[operator]

    def average_replicated(self) -> None:
        """The replicated modules' gradients, averaged over the processes (after a step's last backward)."""
        if not self.replicated:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.replicated]
        flat = torch._utils._flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat)
        flat /= ddp.world_size()
        for p, g in zip(self.replicated, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
            p.grad = g

    def clip_gradients(self, max_norm: float) -> None:
        """Scale every gradient (sharded and replicated) so that their joint 2-norm is at most `max_norm`."""
        sharded = [p.grad for p in self.model.parameters() if p.grad is not None]
        replicated = [p.grad for p in self.replicated if p.grad is not None]
        parts = [nn.utils.get_total_norm(sharded), nn.utils.get_total_norm(replicated)]
        total = torch.linalg.vector_norm(torch.stack([_whole(t) for t in parts]))
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # what clip_grad_norm_ computes
        for g in [*sharded, *replicated]:
            _local(g).mul_(coef)

    def state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every trained module's full state dict on rank 0 (empty elsewhere). Collective."""
        states = {name: m.state_dict() for name, m in self.all.items() if name != "model"}
        return {"model": get_model_state_dict(self.model, options=_FULL), **states}

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimiser's full state keyed by parameter names (rank 0; collective)."""
        return get_optimizer_state_dict(nn.ModuleDict(self.all), optimizer, options=_FULL)

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(nn.ModuleDict(self.all), optimizer, state, options=_EVERYWHERE)

    def finite(self) -> bool:
        """Whether every process's shard of every floating-point weight and buffer is finite (agreed by all)."""
        local = all(
            torch.isfinite(_local(t)).all()
            for m in self.all.values()
            for t in [*m.parameters(), *m.buffers()]
            if t.is_floating_point()
        )
        return not ddp.any_rank(not local, self.device)

    def release(self) -> None:
        """Hand the model back unsharded, holding the trained weights, in every process."""
        full = get_model_state_dict(self.model, options=_EVERYWHERE)
        for m, cls, attributes in self.saved:
            m.__class__ = cls
            m.__dict__.clear()
            m.__dict__.update(attributes)
            _composable_state._module_state_mapping.pop(m, None)  # so that a later fit may shard it again
        with torch.no_grad():  # into the original parameter objects: tied weights stay tied
            for key, p in self.model.named_parameters():
                p.data = full[key].to(p.device)
            for key, b in self.model.named_buffers():
                if key in full:
                    b.copy_(full[key])


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t
