"""What a recipe is: its run function, the checks only it needs, and the runs it needs first."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig


@dataclass(frozen=True)
class Need:
    """A run this run needs first (a teacher, a model to prune): found by the meaning of its config, or trained."""

    role: str  # how logs and prerequisites.json name it: "teacher", "source"
    key: str  # the config key that receives its run folder: "teacher.run"
    command: str  # the command that makes it: "train"
    overrides: list[str] = field(default_factory=list)  # its own overrides of that command's config (epochs, optim)
    nodes: dict[str, Any] = field(default_factory=dict)  # nodes set as given: its model, this run's data
    merged: dict[str, Any] = field(default_factory=dict)  # nodes merged over its composed config (a partial model)


@dataclass(frozen=True)
class Recipe:
    """One command: `run(cfg, run_dir, resume)` -> summary, its own checks, and the runs it needs first."""

    run: Callable[[DictConfig, Path, bool], dict]
    check: Callable[[DictConfig], list[str]] = lambda cfg: []  # problems of a composed config, checked by validation
    needs: Callable[[DictConfig], list[Need]] = lambda cfg: []
    # numbers of its summary.json beyond the split metrics and runner/objective.py's COMMON: sweep objectives
    summary_keys: tuple[str, ...] = ()

    def __call__(self, cfg: DictConfig, run_dir: Path, resume: bool = False) -> dict:
        """Run the recipe (what the registry's entries are: callables)."""
        return self.run(cfg, run_dir, resume)
