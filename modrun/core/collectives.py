"""Collectives of a data-parallel run, used inside the loop: ranks, sharded sample order,
buffer broadcast, metric sums (one process: each is a no-op). The launcher lives in modrun.runner.parallel."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DistributedSampler

from modrun.core.errors import UserError


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def processes(cfg: DictConfig) -> int:
    """How many processes a run asks for (1: the ordinary single-process run)."""
    trainer = cfg.get("trainer") or {}
    return int(trainer.get("devices", 1) or 1) * int(trainer.get("nodes", 1) or 1)


def in_worker() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


# ------------------------------------------------------------------------------------------ inside the loop


def shard_order(n: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """This rank's share of an epoch's sample order: torch's DistributedSampler, seeded so that its global
    permutation is the single-process one (padded to a multiple of the world size, then rank::world)."""
    sampler = DistributedSampler(range(n), world_size(), rank(), shuffle=shuffle, seed=seed * 1_000_003)
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler), dtype=torch.long)


def broadcast_state(modules: Iterable[nn.Module], buffers_only: bool = True) -> None:
    """Rank 0's buffers (and, at the start, parameters too) on every rank, one flat message per dtype."""
    tensors = [t.data for m in modules for t in (m.buffers() if buffers_only else m.state_dict().values())]
    for dtype in sorted({t.dtype for t in tensors}, key=str):  # the same order in every process
        group = [t for t in tensors if t.dtype == dtype]
        flat = torch._utils._flatten_dense_tensors(group)
        dist.broadcast(flat, src=0)
        for t, synced in zip(group, torch._utils._unflatten_dense_tensors(flat, group), strict=True):
            t.copy_(synced)


def reduce_sums(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum each running metric over ranks (keys in the same order everywhere: they come from one code path)."""
    if world_size() == 1 or not sums:
        return sums
    keys = sorted(sums)
    flat = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64) for k in keys])
    dist.all_reduce(flat)
    return dict(zip(keys, flat.unbind(0), strict=True))


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when any rank says so: all ranks stop (and save) at the same step."""
    if world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def own_state(ckpt: dict[str, Any]) -> dict[str, Any]:
    """This process's random state and partial metric sums from a checkpoint."""
    ranks = ckpt.get("ranks")
    if ranks is None and world_size() == 1:
        return {"rng": ckpt["rng"], "sums": ckpt["state"]["sums"]}
    written_by = len(ranks) if ranks is not None else 1
    if written_by != world_size():
        raise UserError(
            f"the checkpoint was written by {written_by} process(es), this run has {world_size()}: "
            f"resume with the same trainer.devices x trainer.nodes"
        )
    return ranks[rank()]


class DiscardMetrics:
    """The metrics writer of every process but rank 0: records go nowhere."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def __enter__(self) -> DiscardMetrics:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def gather_objects(obj: Any) -> list[Any]:
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


# ------------------------------------------------------------------------------------------- the launcher
