"""Evaluation beyond the loop's own: a deployable model's scores with its cost."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modrun.core.cost import count_macs, count_params, latency_ms
from modrun.engine.loop import evaluate

SPLITS = ("val", "test")


def scores_and_cost(model: nn.Module, data: Any, prep: Any, batch_size: int, device: torch.device) -> dict[str, Any]:
    """A deployable model's val/test top-1 (eval mode, no augmentation) and its cost: parameters, MACs and
    batch-1 latency (the rows of nested.json and of a stitch run's summary)."""
    example = torch.zeros(1, data.channels, data.image_size, data.image_size, device=device)
    row = {f"{split}/top1": evaluate(model, getattr(data, split), prep, batch_size, device)["top1"] for split in SPLITS}
    return {
        **row,
        "params": count_params(model)["params"],
        "macs": count_macs(model, example),
        "latency_ms_batch1": latency_ms(model, example),
    }
