"""Helpers shared by the experiment scripts: run the real `modrun` CLI as a subprocess, read and format results.

The scripts are run as `python experiments/<script>.py`, so this module is imported as `common`.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any


def modrun(*args: str) -> Path:
    """Run `modrun ARGS`; return the run folder it created (printed on its last log line).

    `trainer.progress=false` is added to every command but `soup`, which has no trainer (and no progress bar).
    """
    quiet = [] if args[0] == "soup" else ["trainer.progress=false"]
    out = subprocess.run(
        [sys.executable, "-m", "modrun.cli", *args, *quiet],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"modrun {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    # "completed: <metrics>  <run folder>" (soup: "completed: <run folder>")
    return Path(out.stderr.strip().splitlines()[-1].split("completed: ", 1)[1].rsplit("  ", 1)[-1])


def read(run: Path, name: str = "summary.json") -> Any:
    """One JSON file of a run folder (summary.json, nested.json, grow.json, ...)."""
    return json.loads((run / name).read_text())


def top1(run: Path) -> float:
    """The run's final test top-1 (%)."""
    return read(run)["final"]["test/top1"]


def cell(values: list[float], digits: int = 2) -> str:
    """`mean ± std` of the values (std 0 for a single one)."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def row(name: str, values: list[float]) -> str:
    """A markdown row: name, mean ± std, number of values."""
    return f"| {name} | {cell(values)} | {len(values)} |"
