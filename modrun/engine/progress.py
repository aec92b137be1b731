"""A rich progress bar on terminals; nothing (epoch log lines only) when output goes to a file or pipe."""

from __future__ import annotations

# imports inside functions here defer rich's live display: only a run with trainer.progress=true draws one
import sys
from typing import Any


class Progress:
    def __init__(self, total: int, initial: int = 0, enabled: bool = True) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.total, self.initial = total, initial
        self._bar: Any = None

    def __enter__(self) -> Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task("training", total=self.total, completed=self.initial)
        return self

    def update(self, completed: int, description: str | None = None) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, description=description)

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()
