"""What every KD method sees: the shapes it is built for, and the outputs captured in each step."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KDContext:
    """Given to a method's constructor: feature shapes (without batch dim) at its layers, and the data's size."""

    student_shapes: list[torch.Size]
    teacher_shapes: list[torch.Size]
    num_classes: int
    num_samples: int  # training samples (memory banks are indexed by sample)


@dataclass
class Outputs:
    """One model's outputs for a batch: logits, and the features captured at a term's layers, in order."""

    logits: torch.Tensor
    feats: list[torch.Tensor] = field(default_factory=list)


def warmup_factor(epoch: int, warmup_epochs: float) -> float:
    """A term's ramp in (0-based) `epoch`: min(epoch / warmup, 1) with epochs counted from 1, as in the DKD and
    ReviewKD reference trainer (mdistiller), so the first epoch gets 1 / warmup; 1 without a warm-up."""
    return 1.0 if warmup_epochs <= 0 else min((epoch + 1) / warmup_epochs, 1.0)


def flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1)


def match_spatial(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bring a feature map to the teacher's spatial size: average-pool down, bilinear up."""
    if x.dim() != 4 or tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return torch.nn.functional.adaptive_avg_pool2d(x, size)
    return torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)


def adapter(s_shape: torch.Size, t_shape: torch.Size) -> torch.nn.Module:
    """A small trainable map from student to teacher channels: 1x1 conv + BN for maps, one linear map applied to
    every token for token features (T, C) of the same length (a transformer's hidden states), linear for vectors."""
    if len(s_shape) == 3 and len(t_shape) == 3:
        return torch.nn.Sequential(
            torch.nn.Conv2d(s_shape[0], t_shape[0], 1, bias=False), torch.nn.BatchNorm2d(t_shape[0])
        )
    if len(s_shape) == 2 and len(t_shape) == 2 and s_shape[0] == t_shape[0]:
        return torch.nn.Sequential(torch.nn.Linear(s_shape[1], t_shape[1]))  # per token: positions are not mixed
    s_dim, t_dim = int(torch.Size(s_shape).numel()), int(torch.Size(t_shape).numel())
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(s_dim, t_dim))
