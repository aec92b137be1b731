"""modrun's training loop against a plain hand-written PyTorch loop: same model, same batches, same process.

    python benchmarks/overhead.py [--model resnet20] [--epochs 3] [--size 2048] [--device cpu]

Prints one JSON object: samples/s of each and their ratio (target: modrun >= 0.97 x plain). The modrun
figure includes everything a run does per epoch (validation, checkpoints, metrics); runs alternate and the
best of `--repeats` is kept for each, which is the fair figure on a noisy shared machine. Validation and test
splits are 32 samples, so evaluation (which the plain loop does not do) barely counts.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from modrun.components.data.base import batches
from modrun.components.data.builtin import synthetic
from modrun.core.registry import MODELS
from modrun.engine.loop import Objective, fit


def make_cfg(args: argparse.Namespace) -> OmegaConf:
    return OmegaConf.create(
        {
            "seed": 0,
            "data": {"batch_size": args.batch_size, "eval_batch_size": 512, "num_workers": 0, "augment": None},
            "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True},
            "sched": {"name": "cosine", "warmup_epochs": 0.0, "min_lr_ratio": 0.0},
            "trainer": {
                "epochs": args.epochs,
                "drop_last": False,
                "grad_clip": None,
                "log_every_steps": 10,
                "checkpoint_every_steps": 50,
                "deterministic": False,
                "progress": False,
            },
        }
    )


def plain_loop(model: torch.nn.Module, data, args: argparse.Namespace, device: torch.device) -> float:
    """What a researcher writes by hand: shuffle, normalise, forward, backward, step, cosine schedule."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = args.epochs * -(-len(data.train) // args.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
    model.train()
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        for x, y, _ in batches(data.train, args.batch_size, seed=0, epoch=epoch, shuffle=True):
            loss = F.cross_entropy(model((x - mean) / std), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def modrun_loop(model: torch.nn.Module, data, args: argparse.Namespace, device: torch.device) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        fit(make_cfg(args), Path(tmp), Objective(model), data, device, resume=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def run(args: argparse.Namespace) -> dict:
    """The report as a dict (benchmarks/run_all.py calls this in its own process)."""
    device = torch.device(args.device)
    # tiny val/test splits: the figure measures the loop's own bookkeeping (metrics, checkpoints, schedule),
    # not the evaluation work that the plain loop skips
    data = synthetic(size=args.size, val_size=32, test_size=32, image_size=32).to(device)
    samples = args.epochs * len(data.train)
    times: dict[str, list[float]] = {"plain": [], "modrun": []}
    for _ in range(args.repeats):
        for name, loop in (("plain", plain_loop), ("modrun", modrun_loop)):
            torch.manual_seed(0)
            model = MODELS.get(args.model)(in_channels=3, num_classes=10).to(device)
            times[name].append(loop(model, data, args, device))
    plain, ours = samples / min(times["plain"]), samples / min(times["modrun"])
    return {
        "benchmark": "overhead",
        "model": args.model,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "samples": samples,
        "plain_samples_per_s": round(plain, 1),
        "modrun_samples_per_s": round(ours, 1),
        "ratio": round(ours / plain, 3),
        "target": 0.97,
        "times_s": {k: [round(t, 3) for t in v] for k, v in times.items()},
    }


def main() -> None:
    print(json.dumps(run(parser().parse_args()), indent=2))


if __name__ == "__main__":
    main()
