"""Extra metric sinks beside metrics.jsonl (which stays the source of truth). Registry `loggers`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modrun.registry import LOGGERS

LOGGERS.lazy("none", "modrun.loggers:NullLogger", "metrics.jsonl only")


class NullLogger:
    """Writes nothing beyond metrics.jsonl."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def log(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass
