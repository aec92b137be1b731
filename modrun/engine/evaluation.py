"""Evaluation: the task's metrics over a split, and a deployable model's scores with its cost."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modrun.components.data.base import Preprocess, Split, batches
from modrun.components.data.tasks import split_task
from modrun.core import collectives as ddp
from modrun.core.cost import count_macs, count_params, latency_ms

SPLITS = ("val", "test")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: Split,
    prep: Preprocess,
    batch_size: int,
    device: torch.device,
    every_rank: bool = False,
    **loader: int,
) -> dict:
    """The task's metrics over one split (loss, top-1/top-5 or perplexity and bits per byte). Draws no random
    numbers. `loader` (num_workers, prefetch_factor) applies to file-backed splits.

    In a data-parallel run each process evaluates its share and the sums are added up over processes, or, with
    `every_rank` (a sharded model, whose forward all processes must run together), each evaluates it all."""
    was_training = model.training
    model.eval()
    task = split_task(split)
    sums = {k: 0.0 for k in task.keys}
    shard = "eval" if ddp.world_size() > 1 and not every_rank else None
    for x, y, _ in batches(split, batch_size, device=device, shard=shard, **loader):
        for k, v in task.sums(model(prep(x)), y).items():
            sums[k] += v.item()
    model.train(was_training)
    total = {k: torch.tensor(float(v)) for k, v in sums.items()}
    total = total if shard is None else ddp.reduce_sums(total)
    return task.metrics({k: float(v) for k, v in total.items()})


def scores_and_cost(model: nn.Module, data: Any, prep: Any, batch_size: int, device: torch.device) -> dict[str, Any]:
    """A deployable model's val/test metrics (the task's: top-1 for images, loss/ppl/bpb for text; eval mode, no
    augmentation) and its cost: parameters, MACs and batch-1 latency (the rows of nested.json and of a stitch
    run's summary)."""
    example = data.example(1, device)
    row = {
        f"{split}/{k}": v
        for split in SPLITS
        for k, v in evaluate(model, getattr(data, split), prep, batch_size, device).items()
        if k != "top5"
    }
    return {
        **row,
        "params": count_params(model)["params"],
        "macs": count_macs(model, example),
        "latency_ms_batch1": latency_ms(model, example),
    }
