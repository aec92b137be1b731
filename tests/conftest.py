"""Shared test helpers: run the real CLI in-process (CliRunner) or as a subprocess, and read run folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modrun.cli import app

# a tiny, fast configuration: 1 epoch of an 8-wide CNN on digits (about a second on one CPU core)
FAST = ["trainer.epochs=1", "model.width=16", "optim.lr=0.2", "data.batch_size=32", "trainer.progress=false"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own folder: relative runs/ lands there."""
    monkeypatch.chdir(tmp_path)


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    @property
    def text(self) -> str:
        return self.out + self.err


def cli(*args: str) -> Result:
    """Invoke `modrun ARGS` in this process."""
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return Result(result.exit_code, result.stdout, result.stderr)


def cli_subprocess(*args: str, cwd: Path | None = None, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """Invoke `modrun ARGS` as a real process (for kills, signals and import checks)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "modrun.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
        **kw,
    )


def only_run(command: str = "train", runs_dir: Path = Path("runs")) -> Path:
    runs = sorted((runs_dir / command).iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
