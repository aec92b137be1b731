"""Runs found by what they mean: a hash of a run's semantic config, and an index file per hash.

Every run folder is listed under `<runs_dir>/.index/<command>/<key>` when it is created, so finding a completed
run with the same meaning (to reuse it as a teacher or as the model to prune) reads one small file instead of
every config.yaml. The key leaves out what does not change the trained weights: names, paths, loggers,
progress display, checkpoint cadence, process count, worker count."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

INDEX = ".index"
NOT_SEMANTIC = {"name", "runs_dir", "logger", "sweep", "device", "imports"}
NOT_SEMANTIC_IN = {
    "trainer": {
        "progress", "log_every_steps", "checkpoint_every_steps", "devices", "nodes", "rdzv_endpoint", "compile",
        "channels_last", "find_unused_parameters", "strategy",
    },
    "data": {"num_workers", "in_memory_mb", "eval_batch_size"},
}  # fmt: skip
AS_IF_ABSENT = [("trainer", "accumulate_grad_batches", 1)]


def semantic_key(command: str, cfg: DictConfig | dict[str, Any]) -> str:
    """16 hex digits that two configs share exactly when they train the same model the same way."""
    tree = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    tree = {k: v for k, v in tree.items() if k not in NOT_SEMANTIC}
    for node, keys in NOT_SEMANTIC_IN.items():
        if isinstance(tree.get(node), dict):
            tree[node] = {k: v for k, v in tree[node].items() if k not in keys}
    for node, key, default in AS_IF_ABSENT:  # a run recorded before the key existed trained the same way
        if isinstance(tree.get(node), dict) and tree[node].get(key) == default:
            del tree[node][key]
    blob = json.dumps({"command": command, "config": tree}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def root(runs_dir: Path | str) -> Path:
    """The runs folder a config names, `~` expanded (a folder literally named `~` is never what was meant)."""
    return Path(str(runs_dir)).expanduser()


def index_dir(runs_dir: Path | str, command: str) -> Path:
    return root(runs_dir) / INDEX / command  # beside the command folders, so listing runs/<command>/ shows runs only


def add(runs_dir: Path | str, command: str, key: str, run_dir: Path) -> None:
    """List `run_dir` under its key (appended: a line per run, newest last)."""
    folder = index_dir(runs_dir, command)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / key, "a") as f:
        f.write(os.path.relpath(Path(run_dir).resolve(), root(runs_dir).resolve()) + "\n")


def lookup(runs_dir: Path | str, command: str, key: str) -> list[Path]:
    """The run folders listed under `key` that still exist, newest first."""
    path = index_dir(runs_dir, command) / key
    if not path.is_file():
        return []
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    found = [root(runs_dir) / line for line in reversed(lines)]
    return [p for p in dict.fromkeys(found) if (p / "config.yaml").is_file()]


def forget_missing(runs_dir: Path | str, command: str) -> None:
    """Remove the index files whose every run folder is gone (a run discarded for bad input), then the index
    folders and `runs_dir` itself if that left them empty: bad input leaves nothing behind."""
    folder = index_dir(runs_dir, command)
    for path in folder.glob("*") if folder.is_dir() else []:
        try:
            lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        except OSError:
            continue
        if not any((root(runs_dir) / line / "config.yaml").is_file() for line in lines):
            path.unlink(missing_ok=True)
    for empty in (folder, folder.parent, root(runs_dir)):
        try:
            empty.rmdir()
        except OSError:
            return  # not empty (or not there): other runs live there


@contextmanager
def locked(runs_dir: Path | str, command: str, key: str) -> Iterator[None]:
    """Hold an exclusive lock on `key` (other processes asking for the same run wait here until it is made)."""
    folder = index_dir(runs_dir, command)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{key}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
