"""Structured pruning makes a GPT measurably faster: 50 % of its attention heads and MLP neurons removed
(`prune=channel`) or 50 % of its blocks removed (`prune=layers`), CPU forward latency against the dense model in
the same process, MACs beside it so the gap between counted and measured speed-up shows.

    python benchmarks/prune_transformer_speed.py [--n-layer 8] [--n-embd 256] [--batch 16] [--tokens 128]

Prints one JSON object (targets: width >= 1.8x, depth >= 1.9x at batch 16 x 128 tokens). The three models are
timed in alternating rounds (median of the rounds), so a noisy machine slows them alike. The weights are random:
latency does not depend on their values, and the pruners' choices (which heads, which blocks) do not change it.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
from pathlib import Path

import torch

from modrun.components.models.gpt import GPT
from modrun.core import cost
from modrun.methods.prune.context import PruneContext, select_layers
from modrun.methods.prune.depth import layers
from modrun.methods.prune.structured import channel


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-layer", type=int, default=8)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--n-head", type=int, default=8)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--repeats", type=int, default=10)
    return p


def pruned(dense: GPT, method: str, ratio: float, example: torch.Tensor) -> GPT:
    """A copy of `dense` pruned the way `modrun prune prune=channel|layers` prunes it."""
    model = copy.deepcopy(dense)
    targets = select_layers(model, ["*"], [], ["Linear"])
    gen = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, dense.tok_emb.num_embeddings, example.shape, generator=gen) for _ in range(2)]
    with tempfile.TemporaryDirectory() as tmp:
        ctx = PruneContext(model, targets, 0, example, dense.tok_emb.num_embeddings, Path(tmp), lambda n: lambda: calib)
        pruner = channel(ctx, ratio=ratio) if method == "channel" else layers(ctx, ratio=ratio, calib_batches=2)
        pruner.start(0)
    return model.eval()


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    dense = GPT(args.vocab, args.tokens, args.n_layer, args.n_head, args.n_embd).eval()
    example = torch.zeros(args.batch, args.tokens, dtype=torch.long)
    models = {"dense": dense, **{m: pruned(dense, m, args.ratio, example[:2]) for m in ("channel", "layers")}}
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            times[name].append(cost.latency_ms(model, example, repeats=args.repeats, warmup=2))
    latency = {name: statistics.median(t) for name, t in times.items()}
    macs = {name: cost.count_macs(m, example[:1]) for name, m in models.items()}
    params = {name: cost.count_params(m)["params"] for name, m in models.items()}
    return {
        "benchmark": "prune_transformer_speed",
        "model": {"n_layer": args.n_layer, "n_embd": args.n_embd, "n_head": args.n_head, "vocab": args.vocab},
        "input": [args.batch, args.tokens],
        "ratio": args.ratio,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "params": params,
        "macs_per_sample": macs,
        "latency_ms": {k: round(v, 3) for k, v in latency.items()},
        "speedup": {m: round(latency["dense"] / latency[m], 3) for m in ("channel", "layers")},
        "macs_ratio": {m: round(macs["dense"] / macs[m], 3) for m in ("channel", "layers")},
        "targets": {"channel": 1.8, "layers": 1.9},
    }


def main() -> None:
    print(json.dumps(run(parser().parse_args()), indent=2))


if __name__ == "__main__":
    main()
