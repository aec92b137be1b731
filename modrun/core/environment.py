"""Where a run ran: versions and hardware (env.json), and the git state of the user's working directory."""

from __future__ import annotations

# imports inside functions here defer torch: `modrun runs` and the CLI read run folders without loading torch
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any


def env_info() -> dict[str, Any]:
    """Versions and hardware: what a reader needs to judge whether a result should reproduce."""
    import importlib.metadata as md

    import torch

    import modrun

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "modrun": modrun.__version__,
        "argv": sys.argv,
    }
    info["packages"] = dict(sorted((d.metadata["Name"] or "?", d.version) for d in md.distributions()))
    return info


def git_info(cwd: Path) -> tuple[dict[str, Any], str] | None:
    """Commit and dirty state of the user's working directory, or None when it is not a repo."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
    except (OSError, subprocess.SubprocessError):
        return None
    diff = git("diff", "HEAD")
    info = {
        "commit": commit,
        "branch": git("rev-parse", "--abbrev-ref", "HEAD").strip(),
        "dirty": bool(git("status", "--porcelain").strip()),
        "root": git("rev-parse", "--show-toplevel").strip(),
    }
    return info, diff
