"""Distillation speed, in one process on the same synthetic 32x32 batches (resnet56 -> resnet20 by default):

1. the modrun distill loop against a plain hand-written PyTorch KD loop (target ratio >= 0.95);
2. the teacher-output cache: throughput of the epochs after the first, cache on vs off (target >= 1.8x).

    python benchmarks/distill_speed.py [--epochs 3] [--size 1024] [--device cpu]

Prints one JSON object. Validation and test splits are 32 samples, so evaluation barely counts.
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
from modrun.core.runfolder import read_metrics
from modrun.engine.loop import fit
from modrun.methods.distill.methods_logit import soft_kl
from modrun.methods.distill.objective import DistillObjective


def config(args: argparse.Namespace, cache: bool) -> OmegaConf:
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
                "checkpoint_every_steps": 0,
                "deterministic": False,
                "progress": False,
            },
            "kd": {
                "task_weight": 1.0,
                "cache_teacher": cache,
                "teacher_mode": "mean",
                "terms": {"kd": {"name": "kd", "weight": 1.0, "temperature": 4.0}},
            },
        }
    )


def models(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    teacher = MODELS.get(args.teacher)(in_channels=3, num_classes=10).to(device).eval().requires_grad_(False)
    return MODELS.get(args.student)(in_channels=3, num_classes=10).to(device), teacher


def modrun_run(args: argparse.Namespace, data, device: torch.device, cache: bool) -> tuple[float, list[float]]:
    """Total seconds of fit(), and the wall time of each epoch (from metrics.jsonl)."""
    student, teacher = models(args, device)
    cfg = config(args, cache)
    with tempfile.TemporaryDirectory() as tmp:
        objective = DistillObjective(student, [teacher], cfg.kd, data, device, Path(tmp))
        t0 = time.perf_counter()
        fit(cfg, Path(tmp), objective, data, device, resume=False)
        total = time.perf_counter() - t0
        ends = [m["time"] for m in read_metrics(Path(tmp)) if m["split"] == "val"]
    return total, [b - a for a, b in zip([0.0, *ends], ends, strict=False)]


def plain_run(args: argparse.Namespace, data, device: torch.device, teacher_on: bool = True) -> float:
    """What a researcher writes by hand: teacher forward without grad, CE + KL, one optimiser step.
    Without the teacher (`teacher_on=False`): the student trained alone, the most a teacher cache can reach."""
    student, teacher = models(args, device)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs * -(-len(data.train) // args.batch_size))
    mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        for x, y, _ in batches(data.train, args.batch_size, seed=0, epoch=epoch, shuffle=True):
            x = (x - mean) / std
            if teacher_on:
                with torch.no_grad():
                    t_logits = teacher(x)
            s_logits = student(x)
            loss = F.cross_entropy(s_logits, y)
            if teacher_on:
                loss = loss + soft_kl(s_logits, t_logits, 4.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--student", default="resnet20")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def run(args: argparse.Namespace) -> dict:
    """The report as a dict (benchmarks/run_all.py calls this in its own process)."""
    device = torch.device(args.device)
    data = synthetic(size=args.size, val_size=32, test_size=32, image_size=32).to(device)
    samples = args.epochs * len(data.train)
    plain, ours, cached_epochs, uncached_epochs, alone = [], [], [], [], []
    for _ in range(args.repeats):
        plain.append(plain_run(args, data, device))
        alone.append(plain_run(args, data, device, teacher_on=False))
        total, epochs = modrun_run(args, data, device, cache=False)
        ours.append(total)
        uncached_epochs.append(sum(epochs[1:]))
        cached_epochs.append(sum(modrun_run(args, data, device, cache=True)[1][1:]))
    later = (args.epochs - 1) * len(data.train)
    report = {
        "benchmark": "distill_speed",
        "teacher": args.teacher,
        "student": args.student,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "samples": samples,
        "plain_kd_samples_per_s": round(samples / min(plain), 1),
        "modrun_kd_samples_per_s": round(samples / min(ours), 1),
        "loop_ratio": round(min(plain) / min(ours), 3),
        "loop_target": 0.95,
        "after_first_epoch_samples_per_s": {
            "no_cache": round(later / min(uncached_epochs), 1),
            "cache": round(later / min(cached_epochs), 1),
        },
        "cache_speedup": round(min(uncached_epochs) / min(cached_epochs), 3),
        # the ceiling of any teacher cache: the student trained alone (plain loop, no teacher at all)
        "student_alone_samples_per_s": round(samples / min(alone), 1),
        "ceiling_speedup": round(min(plain) / min(alone), 3),
        "cache_target": 1.8,
    }
    return report


def main() -> None:
    print(json.dumps(run(parser().parse_args()), indent=2))


if __name__ == "__main__":
    main()
