"""Token-level distillation speed: modrun's distill loop against a plain hand-written KD loop for GPTs, in one
process on the same python_docs windows (teacher 4 x 128 -> student 2 x 64, as experiment=kd_lm_python_docs).

    python benchmarks/lm_distill_speed.py [--windows 512] [--epochs 2] [--repeats 3] [--device cpu]

Prints one JSON object: tokens/s of each and their ratio (target: modrun >= 0.95 x plain). Both: teacher
forward without gradients, student cross-entropy + KL(T=1) over every token, AdamW, cosine schedule, gradient
clipping. The modrun figure includes its per-epoch validation (8 windows), metrics and checkpoints. Runs
alternate and the best of `--repeats` is kept for each.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_speed import alternate, autocast, lm_data, make_cfg, paired_ratio
from omegaconf import OmegaConf

from modrun.components.data.base import batches
from modrun.components.models.gpt import GPT
from modrun.engine.loop import fit
from modrun.methods.distill.methods_logit import soft_kl
from modrun.methods.distill.objective import DistillObjective


def models(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    teacher = GPT(256, args.block_size, 4, 4, 128).to(device).eval().requires_grad_(False)
    return GPT(256, args.block_size, 2, 2, 64).to(device), teacher


def plain_loop(args: argparse.Namespace, data, device: torch.device) -> float:
    student, teacher = models(args, device)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs * -(-len(data.train) // args.batch_size))
    student.train()
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        for x, y, _ in batches(data.train, args.batch_size, seed=0, epoch=epoch, shuffle=True):
            with autocast(args, device):
                with torch.no_grad():
                    t_logits = teacher(x).flatten(0, 1)
                s_logits = student(x).flatten(0, 1)
                loss = F.cross_entropy(s_logits, y.reshape(-1)) + soft_kl(s_logits, t_logits, 1.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            sched.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def modrun_loop(args: argparse.Namespace, data, device: torch.device) -> float:
    student, teacher = models(args, device)
    cfg = make_cfg(args)
    kd = {"task_weight": 1.0, "cache_teacher": False, "cache_topk": None, "teacher_mode": "mean"}
    cfg.kd = OmegaConf.create({**kd, "terms": {"kd": {"name": "kd", "weight": 1.0, "temperature": 1.0}}})
    with tempfile.TemporaryDirectory() as tmp:
        objective = DistillObjective(student, [teacher], cfg.kd, data, device, Path(tmp))
        t0 = time.perf_counter()
        fit(cfg, Path(tmp), objective, data, device, resume=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--windows", type=int, default=512, help="training windows per epoch")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precision", default="32", choices=["32", "bf16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    data = lm_data(args, device)
    tokens = args.epochs * args.windows * args.block_size
    loops = {"plain": lambda: plain_loop(args, data, device), "modrun": lambda: modrun_loop(args, data, device)}
    times = alternate(loops, args.repeats)
    plain, ours = tokens / min(times["plain"]), tokens / min(times["modrun"])
    return {
        "benchmark": "lm_distill_speed",
        "teacher": "gpt 4 x 128",
        "student": "gpt 2 x 64",
        "device": str(device),
        "precision": args.precision,
        "threads": torch.get_num_threads(),
        "tokens": tokens,
        "plain_kd_tokens_per_s": round(plain, 1),
        "modrun_kd_tokens_per_s": round(ours, 1),
        "ratio": round(ours / plain, 3),
        "ratio_paired_median": round(paired_ratio(times), 3),
        "target": 0.95,
        "times_s": {k: [round(t, 3) for t in v] for k, v in times.items()},
    }


def main() -> None:
    print(json.dumps(run(parser().parse_args()), indent=2))


if __name__ == "__main__":
    main()
