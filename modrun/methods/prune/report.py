"""Dense vs pruned: parameters, non-zero parameters, MACs, file size, measured latency, accuracy."""

from __future__ import annotations

import copy
import logging
import statistics
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from safetensors.torch import save
from torch import nn

from modrun.core import cost

log = logging.getLogger("modrun")
NOTE_UNSTRUCTURED = (
    "unstructured sparsity zeroes weights but keeps dense tensors: dense kernels run no faster and the file is "
    "no smaller; only structured (channel) pruning makes the model measurably faster"
)


def measure(model: nn.Module, data: Any) -> dict[str, Any]:
    """What a model costs to store and to run, counted (not timed), on one example of the data (an image, or a
    window of block_size tokens)."""
    cpu_model = copy.deepcopy(model).cpu().eval()
    example = data.example(1, "cpu")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return {
        **cost.count_params(model),
        "macs": cost.count_macs(cpu_model, example),
        "sparse_macs": sparse_macs(cpu_model, example),
        "file_bytes": len(save(state)),
    }


def latencies(models: dict[str, nn.Module], data: Any, device: torch.device, rounds: int = 5) -> dict:
    """Median forward latency of each model at batch 1 and 64, on CPU (and CUDA when used). The models are
    timed in alternating rounds so that a noisy machine slows them alike; the median of the rounds is kept."""
    results: dict[str, dict[str, list[float]]] = {name: {} for name in models}
    setups = [("cpu", 1), ("cpu", 64)] + ([("cuda", 64)] if device.type == "cuda" else [])
    copies = {name: {d: copy.deepcopy(m).to(d).eval() for d, _ in setups} for name, m in models.items()}
    for _ in range(rounds):
        for d, batch in setups:
            x = data.example(batch, d)
            for name in models:
                key = f"latency_ms_{d}_b{batch}"
                results[name].setdefault(key, []).append(cost.latency_ms(copies[name][d], x, repeats=10, warmup=2))
    return {name: {k: statistics.median(v) for k, v in r.items()} for name, r in results.items()}


@torch.no_grad()
def sparse_macs(model: nn.Module, example: torch.Tensor) -> int:
    """MACs that touch non-zero weights: what sparse kernels could skip, not what dense ones do."""
    total = 0

    def hook(m: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        density = m.weight.count_nonzero().item() / m.weight.numel()
        kernel = (
            m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            if isinstance(m, nn.Conv2d)
            else (m.in_features)
        )
        total += int(output.numel() * kernel * density)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    model(example)
    for h in handles:
        h.remove()
    return total // example.shape[0]


def print_report(dense: dict[str, Any], pruned: dict[str, Any], structured: bool) -> None:
    table = Table("", "dense", "pruned", "pruned / dense", title="cost report")
    rows = [
        ("params", "params"),
        ("non-zero params", "nonzero_params"),
        ("MACs", "macs"),
        ("MACs on non-zero weights", "sparse_macs"),
        ("file size (bytes)", "file_bytes"),
        ("CPU latency b1 (ms)", "latency_ms_cpu_b1"),
        ("CPU latency b64 (ms)", "latency_ms_cpu_b64"),
        ("CUDA latency b64 (ms)", "latency_ms_cuda_b64"),
        ("test top-1 (%)", "test_top1"),
        ("test loss", "test_loss"),
        ("test bits per byte", "test_bpb"),
    ]
    for label, key in rows:
        if key in dense and key in pruned:
            a, b = dense[key], pruned[key]
            fmt = (lambda v: f"{v:.3f}") if isinstance(a, float) else (lambda v: f"{v:,}")
            table.add_row(label, fmt(a), fmt(b), f"{b / a:.3f}" if a else "")
    Console(stderr=True).print(table)
    speedup = dense["latency_ms_cpu_b64"] / pruned["latency_ms_cpu_b64"]
    log.info(f"measured CPU speed-up at batch 64: {speedup:.2f}x")
    if not structured:
        log.info(f"note: {NOTE_UNSTRUCTURED}")
