"""Runs made of several training phases (m2m's stages, IMP's rounds): each phase trains through the ordinary
loop with its own checkpoints (`checkpoints/<phase>/`), and a killed run skips the phases it finished."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from modrun.core import checkpoint
from modrun.core.collectives import barrier, is_main
from modrun.core.runfolder import read_json, write_json


def done_path(run_dir: Path, phase: str) -> Path:
    return Path(run_dir) / "checkpoints" / phase / "done.json"


def run_phase(
    run_dir: Path,
    phase: str,
    seed: int,
    train: Callable[[], dict],
    restore: Callable[[dict[str, Any]], None],
    device: torch.device,
) -> dict:
    """The result of `phase`: read back (after `restore` took its final checkpoint) when a killed run had
    finished it, else trained now from its own seed and recorded as done."""
    done = done_path(run_dir, phase)
    if done.exists():
        restore(checkpoint.load(done.parent / "last.pt", device))
        return read_json(done)
    checkpoint.seed_everything(seed)  # each phase starts from its own seed, resumed or not
    result = train()
    if is_main():  # data-parallel: rank 0 writes for the run
        write_json(done, result)
    barrier()  # every process has finished the phase before any looks for the next one's marker
    return result
