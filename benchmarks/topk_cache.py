"""Top-k teacher cache on a GPT, in one process on the same python_docs windows:

1. bytes per cached token, read from the cache files (target: 6 K, against 4 x vocabulary for a dense fp32 row);
2. training steps/s once the cache is full, against the student trained alone (target >= 0.95 of that
   ceiling), and against KD with the teacher run every step.

    python benchmarks/topk_cache.py [--k 32] [--steps 30] [--batch-size 32] [--block-size 128] [--repeats 3]

Prints one JSON object. Steps are the objective's loss, backward and an AdamW step (the loop around them is the
same for every variant and measured by lm_speed.py). The variants alternate over `--repeats` passes; the
ratio is the best pass of each, and the median of back-to-back pairs beside it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_speed import alternate, paired_ratio
from omegaconf import OmegaConf

from modrun.components.data.text import python_docs
from modrun.components.models.gpt import GPT
from modrun.methods.distill.objective import DistillObjective


def objective(args: argparse.Namespace, data, folder: Path, k: int | None, cache: bool) -> DistillObjective:
    torch.manual_seed(0)
    student, teacher = GPT(256, args.block_size, 2, 2, 64), GPT(256, args.block_size, 4, 4, 128)
    kd = {"task_weight": 1.0, "teacher_mode": "mean", "cache_teacher": cache, "cache_topk": k,
          "terms": {"kd": {"name": "kd", "weight": 1.0, "temperature": 1.0}}}  # fmt: skip
    return DistillObjective(student, [teacher], OmegaConf.create(kd), data, torch.device("cpu"), folder)


def timed(step, batches: list):
    """Seconds of one pass of `step` over the batches (what `alternate` repeats)."""

    def run() -> float:
        start = time.perf_counter()
        for b in batches:
            step(*b)
        return time.perf_counter() - start

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    data = python_docs(args.block_size, windows_per_epoch=args.steps * args.batch_size)
    data.train.fixed = True
    idx = torch.arange(len(data.train)).split(args.batch_size)
    batches = [(*data.train.window(i, 0, 0), i) for i in idx]
    result = {"k": args.k, "tokens": len(data.train) * args.block_size}
    with tempfile.TemporaryDirectory() as tmp:
        loops = {}
        for name, k, cache in (("topk_cached", args.k, True), ("kd_uncached", None, False)):
            obj = objective(args, data, Path(tmp) / name, k, cache)
            opt = torch.optim.AdamW(obj.model.parameters(), lr=1e-3)

            def step(x, y, i, obj=obj, opt=opt):
                loss = obj.loss(x, y, i)[0]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            if cache:
                with torch.no_grad():
                    for x, y, i in batches:
                        obj.loss(x, y, i)  # fill the cache: the timed steps are the epochs after the first
                files = list((Path(tmp) / name / "teacher_cache").iterdir())
                result["bytes_per_token"] = sum(f.stat().st_size for f in files) / result["tokens"]
            loops[name] = timed(step, batches)
        torch.manual_seed(0)
        alone = GPT(256, args.block_size, 2, 2, 64)
        opt = torch.optim.AdamW(alone.parameters(), lr=1e-3)

        def plain(x, y, i):
            loss = F.cross_entropy(alone(x).reshape(-1, 256), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        loops["student_alone"] = timed(plain, batches)
        for loop in loops.values():
            loop()  # warm-up pass each
        times = alternate(loops, args.repeats)
    result["dense_bytes_per_token"] = 4 * 256
    result["steps_per_s"] = {k: round(len(batches) / min(v), 2) for k, v in times.items()}
    result["topk_vs_student_alone"] = round(min(times["student_alone"]) / min(times["topk_cached"]), 3)
    pairs = {"plain": times["student_alone"], "modrun": times["topk_cached"]}
    result["topk_vs_student_alone_paired_median"] = round(paired_ratio(pairs), 3)
    result["topk_vs_uncached_kd"] = round(min(times["kd_uncached"]) / min(times["topk_cached"]), 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
