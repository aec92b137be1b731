"""Structured channel pruning makes models measurably faster: resnet56 with 50% of its channels removed
(Torch-Pruning through modrun's `channel` pruner), CPU latency dense vs pruned in the same process.

    python benchmarks/prune_speed.py [--model resnet56] [--ratio 0.5] [--size 32]

Prints one JSON object (target: >= 2x at batch 64). Latencies are medians of alternating rounds.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

from modrun.core import cost
from modrun.core.registry import MODELS
from modrun.methods.prune.context import PruneContext, select_layers
from modrun.methods.prune.report import latencies
from modrun.methods.prune.structured import channel


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    return parser


def run(args: argparse.Namespace) -> dict:
    """The report as a dict (benchmarks/run_all.py calls this in its own process). Latency is on the CPU."""
    torch.manual_seed(0)
    dense = MODELS.get(args.model)(in_channels=3, num_classes=10).eval()
    pruned = copy.deepcopy(dense)
    example = torch.zeros(1, 3, args.size, args.size)
    targets = select_layers(pruned, ["*"], [], ["Conv2d", "Linear"])
    with tempfile.TemporaryDirectory() as tmp:
        channel(PruneContext(pruned, targets, 0, example, 10, Path(tmp)), ratio=args.ratio).start(0)
    images = SimpleNamespace(example=lambda batch, device: torch.zeros(batch, 3, args.size, args.size, device=device))
    timed = latencies({"dense": dense, "pruned": pruned}, images, torch.device("cpu"), rounds=args.rounds)
    d, p = timed["dense"], timed["pruned"]
    return {
        "benchmark": "prune_speed",
        "model": args.model,
        "ratio": args.ratio,
        "input": [3, args.size, args.size],
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "params": {"dense": cost.count_params(dense)["params"], "pruned": cost.count_params(pruned)["params"]},
        "macs": {"dense": cost.count_macs(dense, example), "pruned": cost.count_macs(pruned, example)},
        "latency_ms": {"dense": d, "pruned": p},
        "speedup_b1": round(d["latency_ms_cpu_b1"] / p["latency_ms_cpu_b1"], 3),
        "speedup_b64": round(d["latency_ms_cpu_b64"] / p["latency_ms_cpu_b64"], 3),
        "target_b64": 2.0,
    }


def main() -> None:
    print(json.dumps(run(parser().parse_args()), indent=2))


if __name__ == "__main__":
    main()
