"""Every speed figure of modrun in one JSON report, each beside its target, on one device.

    python benchmarks/run_all.py [--quick] [--device cpu|cuda] [--out report.json]

In this process: the training loop against a plain PyTorch loop (overhead.py), the distill loop and the
teacher cache (distill_speed.py), channel-pruning latency (prune_speed.py, CPU), and train throughput with
trainer.precision=bf16 against 32 and trainer.channels_last on against off. As subprocesses (what a user
waits for): `modrun --help` (best of 5) and `modrun train` end to end on digits in a temporary folder.
`--quick` shrinks sizes and repeats (a smoke check, noisier figures). The load average at start and end
is reported: on a shared machine, the ratios (measured in alternation) hold better than the absolute rates.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).parent))  # the sibling benchmarks, also when imported from elsewhere

import distill_speed  # noqa: E402
import overhead  # noqa: E402
import prune_speed  # noqa: E402

from modrun.components.data.builtin import synthetic  # noqa: E402
from modrun.core.registry import MODELS  # noqa: E402
from modrun.engine.loop import Objective, fit  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def speed_options(device: torch.device, quick: bool) -> dict:
    """Train samples/s of resnet20 on synthetic 32x32 data with each speed option, alternating, best of repeats."""
    argv = ["--device", str(device), "--epochs", "1" if quick else "2", "--size", "256" if quick else "2048"]
    args = overhead.parser().parse_args(argv)
    data = synthetic(size=args.size, val_size=32, test_size=32, image_size=32).to(device)
    variants: dict[str, dict] = {"32": {}, "bf16": {"precision": "bf16"}, "channels_last": {"channels_last": True}}
    if device.type == "cuda":
        variants["16-mixed"] = {"precision": "16-mixed"}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(2 if quick else 3):
        for name, trainer in variants.items():
            torch.manual_seed(0)
            model = MODELS.get(args.model)(in_channels=3, num_classes=10).to(device)
            cfg = OmegaConf.merge(overhead.make_cfg(args), {"trainer": trainer})
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                fit(cfg, Path(tmp), Objective(model), data, device, resume=False)
                _sync(device)
                times[name].append(time.perf_counter() - t0)
    rate = {name: args.epochs * len(data.train) / min(t) for name, t in times.items()}
    return {
        "model": args.model,
        "samples_per_s": {name: round(r, 1) for name, r in rate.items()},
        "bf16_vs_32": round(rate["bf16"] / rate["32"], 3),
        "channels_last_vs_off": round(rate["channels_last"] / rate["32"], 3),
        **({"16_mixed_vs_32": round(rate["16-mixed"] / rate["32"], 3)} if "16-mixed" in rate else {}),
        "times_s": {name: [round(x, 3) for x in t] for name, t in times.items()},
    }


def _modrun() -> list[str]:
    script = Path(sys.executable).parent / "modrun"  # the installed console script, as a user runs it
    return [str(script)] if script.exists() else [sys.executable, "-m", "modrun.cli"]


def cli_help(repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([*_modrun(), "--help"], capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return {"best_s": round(min(times), 3), "times_s": [round(t, 3) for t in times]}


def train_end_to_end(device: torch.device, quick: bool) -> dict:
    """`modrun train` with the packaged defaults (cnn_small on digits), start to exit, in a temporary folder."""
    cmd = [*_modrun(), "train", "trainer.progress=false", f"device={device}", *(["trainer.epochs=3"] if quick else [])]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=tmp, capture_output=True, check=True)
        wall = time.perf_counter() - t0
        summary = json.loads(next(Path(tmp).glob("runs/train/*/summary.json")).read_text())
    return {
        "command": " ".join(["modrun", *cmd[len(_modrun()) :]]),
        "wall_s": round(wall, 2),
        "in_run_s": summary["wall_time_s"],
        "epochs": summary["epochs"],
        "val_top1": round(summary["final"]["val/top1"], 2),
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        if names:
            return f"{names[0]} ({len(names)} cores)"
    return platform.processor() or platform.machine()


def figure(value: float, target: float | None, at_least: bool = True) -> dict:
    ok = None if target is None else (value >= target if at_least else value < target)
    sign = "" if target is None else (">= " if at_least else "< ")
    return {"value": value, "target": f"{sign}{target}" if target is not None else None, "ok": ok}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller sizes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="also write the report here")
    args = parser.parse_args()
    device, quick = torch.device(args.device), args.quick
    load_start, t0 = os.getloadavg(), time.time()
    on = ["--device", str(device)]
    over = overhead.run(
        overhead.parser().parse_args(on + (["--epochs", "1", "--size", "512", "--repeats", "2"] if quick else []))
    )
    small = ["--size", "256", "--epochs", "2", "--repeats", "1"] if quick else []
    dist = distill_speed.run(distill_speed.parser().parse_args(on + small))
    prune = prune_speed.run(prune_speed.parser().parse_args(["--rounds", "2"] if quick else []))
    options = speed_options(device, quick)
    helps = cli_help(3 if quick else 5)
    e2e = train_end_to_end(device, quick)
    report = {
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "quick": quick,
        "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
        "figures": {
            "train_loop_vs_plain": figure(over["ratio"], 0.97),
            "distill_loop_vs_plain": figure(dist["loop_ratio"], 0.95),
            "teacher_cache_speedup": figure(dist["cache_speedup"], 1.8),
            "channel_prune_speedup_cpu_b64": figure(prune["speedup_b64"], 2.0),
            "cli_help_s": figure(helps["best_s"], 0.5, at_least=False),
            "train_digits_end_to_end_s": figure(e2e["wall_s"], 60.0 if not quick else None, at_least=False),
            "bf16_vs_32_train_throughput": figure(options["bf16_vs_32"], None),
            "channels_last_vs_off_train_throughput": figure(options["channels_last_vs_off"], None),
        },
        "details": {
            "overhead": over,
            "distill_speed": dist,
            "prune_speed": prune,
            "speed_options": options,
            "cli_help": helps,
            "train_end_to_end": e2e,
        },
        "total_s": round(time.time() - t0, 1),
    }
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
