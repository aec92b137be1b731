"""What every pruner is built from: the model, the layers it may prune, a seed and an example input."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from modrun.core.errors import UserError

LAYER_TYPES = {"Conv2d": nn.Conv2d, "Linear": nn.Linear}


@dataclass
class PruneContext:
    model: nn.Module
    targets: dict[str, nn.Module]  # module path -> layer whose weight may be pruned
    seed: int
    example: torch.Tensor  # one input batch (shape probing, dependency tracing)
    num_classes: int
    run_dir: Path  # where pruners that keep state on disk (IMP's rewind point) write
    # n -> a fresh iterator over the model inputs of the first n training batches (Wanda's statistics)
    calibration: Callable[[int], Callable[[], Iterable[torch.Tensor]]] | None = None
    # n -> the model's mean task loss over those n batches, as it is now (depth pruning's `loss` score)
    calibration_loss: Callable[[int], float] | None = None
    # n -> accumulate into the model's .grad the gradient of that mean loss (importance=taylor's |w x dL/dw|)
    calibration_backward: Callable[[int], None] | None = None


def select_layers(model: nn.Module, include: list[str], exclude: list[str], types: list[str]) -> dict[str, nn.Module]:
    """Layers of the given types whose path matches an `include` pattern and no `exclude` pattern (fnmatch)."""
    unknown = [t for t in types if t not in LAYER_TYPES]
    if unknown:
        raise UserError(f"prune.types: unknown layer type {unknown[0]} (valid: {', '.join(LAYER_TYPES)})")
    kinds = tuple(LAYER_TYPES[t] for t in types)
    chosen = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, kinds)
        and any(fnmatch.fnmatchcase(name, p) for p in include)
        and not any(fnmatch.fnmatchcase(name, p) for p in exclude)
    }
    if not chosen:
        raise UserError(f"prune: no {'/'.join(types)} layer matches include={include} exclude={exclude}")
    return chosen
