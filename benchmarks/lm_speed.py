"""modrun's loop training a GPT against a plain nanoGPT-style loop: same model, same windows, same process.

    python benchmarks/lm_speed.py [--n-layer 4] [--n-embd 128] [--block-size 128] [--windows 512] [--precision bf16]

Prints one JSON object: tokens/s of each and their ratio (target: modrun >= 0.97 x plain). Both draw the
same random windows of python_docs (modrun's own window sampler), AdamW with a cosine schedule and gradient
clipping; the modrun figure includes its per-epoch validation (a small val split), metrics and checkpoints.
Runs alternate (which goes first too) and the best of `--repeats` is kept for each (the fair figure on a
noisy shared machine).
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
from modrun.components.data.text import python_docs
from modrun.components.models.gpt import GPT
from modrun.engine.loop import Objective, fit


def make_cfg(args: argparse.Namespace) -> OmegaConf:
    return OmegaConf.create(
        {
            "seed": 0,
            "data": {"batch_size": args.batch_size, "eval_batch_size": 64, "num_workers": 0, "augment": None},
            "optim": {"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.95], "weight_decay": 0.1, "eps": 1e-8},
            "sched": {"name": "cosine", "warmup_epochs": 0.0, "min_lr_ratio": 0.0},
            "trainer": {
                "epochs": args.epochs,
                "drop_last": False,
                "grad_clip": 1.0,
                "log_every_steps": 10,
                "checkpoint_every_steps": 50,
                "deterministic": False,
                "progress": False,
                "precision": getattr(args, "precision", "32"),
            },
        }
    )


def plain_loop(model: torch.nn.Module, data, args: argparse.Namespace, device: torch.device) -> float:
    """What a researcher writes by hand (nanoGPT's loop): windows, forward, cross-entropy, clip, AdamW step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    steps = args.epochs * -(-len(data.train) // args.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        for x, y, _ in batches(data.train, args.batch_size, seed=0, epoch=epoch, shuffle=True):
            with autocast(args, device):
                logits = model(x)
                loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def autocast(args: argparse.Namespace, device: torch.device) -> torch.autocast:
    """bf16 autocast of forward and loss, as trainer.precision=bf16 does (a no-op at fp32)."""
    return torch.autocast(device.type, torch.bfloat16, enabled=getattr(args, "precision", "32") == "bf16")


def modrun_loop(model: torch.nn.Module, data, args: argparse.Namespace, device: torch.device) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        fit(make_cfg(args), Path(tmp), Objective(model), data, device, resume=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--windows", type=int, default=512, help="training windows per epoch")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="32", choices=["32", "bf16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def lm_data(args: argparse.Namespace, device: torch.device):
    """python_docs windows on the device, with a token evaluation: the figures measure the loop, not eval."""
    data = python_docs(block_size=args.block_size, windows_per_epoch=args.windows)
    data.val.windows = data.test.windows = 8
    return data.to(device)


def alternate(loops: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each loop per repeat; who goes first alternates (the machine warms up)."""
    times: dict[str, list[float]] = {name: [] for name in loops}
    order = list(loops)
    for r in range(repeats):
        for name in order if r % 2 == 0 else order[::-1]:
            times[name].append(loops[name]())
    return times


def paired_ratio(times: dict[str, list[float]]) -> float:
    """The median over repeats of plain's time / modrun's in the same repeat (back to back, so a slow spell of
    the machine slows both): steadier than the best-of ratio when the machine's speed drifts."""
    pairs = sorted(p / m for p, m in zip(times["plain"], times["modrun"], strict=True))
    mid = len(pairs) // 2
    return pairs[mid] if len(pairs) % 2 else (pairs[mid - 1] + pairs[mid]) / 2


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    data = lm_data(args, device)
    tokens = args.epochs * args.windows * args.block_size

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return GPT(256, args.block_size, args.n_layer, max(1, args.n_embd // 32), args.n_embd).to(device)

    times = alternate(
        {
            "plain": lambda: plain_loop(model(), data, args, device),
            "modrun": lambda: modrun_loop(model(), data, args, device),
        },
        args.repeats,
    )
    plain, ours = tokens / min(times["plain"]), tokens / min(times["modrun"])
    return {
        "benchmark": "lm_speed",
        "model": f"gpt n_layer={args.n_layer} n_embd={args.n_embd} block_size={args.block_size}",
        "precision": args.precision,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "tokens": tokens,
        "plain_tokens_per_s": round(plain, 1),
        "modrun_tokens_per_s": round(ours, 1),
        "ratio": round(ours / plain, 3),
        "ratio_paired_median": round(paired_ratio(times), 3),
        "target": 0.97,
        "times_s": {k: [round(t, 3) for t in v] for k, v in times.items()},
    }


def main() -> None:
    print(json.dumps(run(parser().parse_args()), indent=2))


if __name__ == "__main__":
    main()
