"""What a model costs: parameters, non-zero parameters, MACs and measured latency."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

SPLITS = ("val", "test")


def count_params(model: nn.Module) -> dict[str, int]:
    params = list(model.parameters())
    return {"params": sum(p.numel() for p in params), "nonzero_params": sum(int(p.count_nonzero()) for p in params)}


@torch.no_grad()
def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass over `example`: conv and linear layers (the bulk of the cost),
    plus the activation-by-activation products of modules that declare them (`matmul_macs`, e.g. attention)."""
    total = 0

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kernel = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * kernel
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
        elif hasattr(module, "matmul_macs"):
            total += int(module.matmul_macs(inputs[0]))

    counted = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) or hasattr(m, "matmul_macs")]
    handles = [m.register_forward_hook(hook) for m in counted]
    was_training = model.training
    model.eval()
    try:
        model(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total // example.shape[0]


@torch.no_grad()
def latency_ms(model: nn.Module, example: torch.Tensor, repeats: int = 30, warmup: int = 5) -> float:
    """Median wall time of one forward pass, in milliseconds (synchronising CUDA around each)."""
    was_training = model.training
    model.eval()
    sync = torch.cuda.synchronize if example.is_cuda else (lambda: None)
    times = []
    for i in range(warmup + repeats):
        sync()
        t0 = time.perf_counter()
        model(example)
        sync()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1000)
    model.train(was_training)
    return statistics.median(times)
