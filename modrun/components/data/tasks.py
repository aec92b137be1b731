"""What a dataset asks a model to do: the loss, the metrics, and which metric selects the best epoch.

A dataset declares its task (`Data.task`); the loop, evaluation, summaries and sweeps read metric names from
it instead of assuming top-1 accuracy. `classification`: cross-entropy over classes, top-1/top-5 accuracy (%),
best by val top-1. `language_modeling`: next-token cross-entropy in nats per token, perplexity, bits per byte
(byte-level tokenizers: one token is one byte) and token top-1 (%), best by val loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TASKS = ("classification", "language_modeling")


@dataclass(frozen=True)
class Task:
    name: str
    best: str  # the metric that selects the best epoch (and a sweep's default objective)
    maximize: bool
    bytes_per_token: float | None = None  # language modeling with a byte-level tokenizer: 1.0

    @staticmethod
    def flat(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(items, classes) logits and (items,) targets: an image is one item, a token of a window is one."""
        return logits.reshape(-1, logits.shape[-1]), y.reshape(-1)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over items (images or tokens)."""
        return F.cross_entropy(*self.flat(logits, y))

    def sums(self, logits: torch.Tensor, y: torch.Tensor, loss: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-batch sums (on the device, no host sync) that `metrics` turns into the epoch's figures."""
        flat, target = self.flat(logits.detach(), y)
        n = target.numel()
        total = loss.detach() * n if loss is not None else F.cross_entropy(flat, target, reduction="sum")
        out = {"n": torch.tensor(float(n), device=y.device), "loss": total, "top1": (flat.argmax(1) == target).sum()}
        if self.name == "classification" and loss is None:  # top-5 only where it is evaluated, not per train step
            top = flat.topk(min(5, flat.shape[1]), dim=1).indices
            out["top5"] = (top == target[:, None]).any(dim=1).sum()
        return out

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """The epoch's metrics from summed counts: loss per item, accuracies in %, and the task's extras."""
        n = max(float(sums["n"]), 1.0)
        out = {"loss": float(sums["loss"]) / n}
        out.update({k: 100.0 * float(sums[k]) / n for k in ("top1", "top5") if k in sums})
        if self.name == "language_modeling":
            out["ppl"] = math.exp(min(out["loss"], 50.0))  # capped: a diverged model must not overflow
            if self.bytes_per_token:
                out["bpb"] = out["loss"] / math.log(2) / self.bytes_per_token
        return out

    @property
    def keys(self) -> tuple[str, ...]:
        """The sums an evaluation adds up."""
        return ("n", "loss", "top1", "top5") if self.name == "classification" else ("n", "loss", "top1")

    def better(self, value: float, best: float | None) -> bool:
        return best is None or (value > best if self.maximize else value < best)


CLASSIFICATION = Task("classification", "top1", maximize=True)


def language_modeling(bytes_per_token: float | None = 1.0) -> Task:
    return Task("language_modeling", "loss", maximize=False, bytes_per_token=bytes_per_token)


def split_task(split: object) -> Task:
    """The task of a split: a token stream's (data/text.py), else classification."""
    return getattr(split, "task", CLASSIFICATION)
