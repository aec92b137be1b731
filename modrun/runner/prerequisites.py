"""Runs a run needs first (a teacher, the model to prune or grow, stitch anchors), one mechanism for every recipe.

A recipe declares its needs (`Recipe.needs(cfg)`: role, the config key that receives the run folder, the command
and its own overrides). Before the recipe runs, in the parent process (so before any data-parallel worker),
each need becomes a complete config of its own command, composed from the packaged tree (its own epochs,
optimiser and trainer: never the needing run's), and its semantic key (core.index) finds a completed run with
the same meaning, the user's own `modrun train` included. Under a file lock on that key, the first process
trains it (or resumes an unfinished one); parallel sweep jobs wait on the lock and then reuse it. The chosen
folders go into the config key and into `prerequisites.json`, which a resumed run reads back.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from modrun.core import index
from modrun.core.artifacts import load_run_config, prerequisite_record, run_weights, sha256
from modrun.core.errors import UserError
from modrun.core.registry import RECIPES
from modrun.core.runfolder import PREREQUISITES, alive, read_json, reserve_run_dir, write_json, write_record
from modrun.core.stopping import Interrupted
from modrun.recipes.base import Need
from modrun.runner.compose import compose_plain

log = logging.getLogger("modrun")
RECORD = PREREQUISITES
Execute = Callable[..., int]  # lifecycle.execute, passed in: this module is imported by it


def needed_config(need: Need, cfg: DictConfig, config_dir: Path | str | None = None) -> DictConfig:
    """The full config of the run `need` asks for: its command's packaged defaults, its own overrides, its nodes,
    and where and how this run runs (runs_dir, device, imports)."""
    needed = compose_plain(need.command, list(need.overrides), config_dir)
    for key, node in need.nodes.items():
        needed[key] = OmegaConf.create(node) if isinstance(node, dict) else node
    for key, node in need.merged.items():
        needed[key] = OmegaConf.merge(OmegaConf.to_container(needed[key]), node)  # new keys are checked later
    for key in ("runs_dir", "device", "imports"):
        if key in cfg:  # force_add: `imports` (from +imports=...) is not in the packaged tree's struct
            OmegaConf.update(needed, key, cfg[key], merge=False, force_add=True)
    model, data = needed.model.get("name"), needed.data.get("name")
    needed.name = f"{need.role}_{model}_{data}"
    return OmegaConf.create(OmegaConf.to_container(needed, resolve=True))


def resolve(
    command: str, cfg: DictConfig, run_dir: Path, execute: Execute, config_dir: Path | str | None = None
) -> DictConfig:
    """`cfg` with every need's key set to a completed run folder (found, resumed or trained now)."""
    needs = RECIPES.get(command).needs(cfg)
    if not needs:
        return cfg
    recorded = {r["key"]: r for r in _read_record(run_dir)}
    out = OmegaConf.create(OmegaConf.to_container(cfg))
    records = []
    for need in needs:
        earlier = recorded.get(need.key)
        if earlier and _completed(Path(earlier["run"])) and sha256(run_weights(earlier["run"])) == earlier["sha256"]:
            folder, how, key = Path(earlier["run"]), "recorded", earlier["semantic_key"]  # a resumed run: the same one
        else:
            needed = needed_config(need, cfg, config_dir)
            key = index.semantic_key(need.command, needed)
            folder, how = find_or_make(need, needed, key, execute)
        OmegaConf.update(out, need.key, str(folder), merge=False)
        records.append(prerequisite_record(need.role, need.key, folder, how, key))
    write_json(run_dir / RECORD, records)
    return out


def find_or_make(need: Need, needed: DictConfig, key: str, execute: Execute) -> tuple[Path, str]:
    """A completed run of `needed`'s meaning: reused, resumed, or trained now (one process at a time per key)."""
    runs_dir = Path(needed.runs_dir)
    with index.locked(runs_dir, need.command, key):
        for folder in index.lookup(runs_dir, need.command, key):
            if (folder / "reproduces.json").exists():  # a reproduction checks the run it copies; reuse that one
                continue
            status = _status(folder)
            state = status.get("state")
            if state == "completed" and run_weights(folder).is_file():
                log.info(f"{need.role}: reusing {folder} (same meaning, completed)")
                return folder, "reused"
            if state == "created" or (state == "running" and _live_elsewhere(status)):
                where = f"pid {status.get('pid')} on {status.get('host')}" if state == "running" else "state created"
                raise UserError(
                    f"the {need.role} run {folder} is being made ({where}); "
                    f"wait for it, or give {need.key}=<run folder>"
                )
            if state in ("interrupted", "failed", "running") and (folder / "checkpoints" / "last.pt").is_file():
                log.info(f"{need.role}: resuming the unfinished {need.role} run {folder}")
                _run(execute, need, load_run_config(folder)[0], folder, resume=True)
                return folder, "resumed"
        folder = reserve_run_dir(runs_dir, need.command, str(needed.name))
        log.info(f"{need.role}: none given, training {needed.model.name} first in {folder}")
        write_record(folder, needed, need.command, [], argv=[need.command, *need.overrides])
        _run(execute, need, needed, folder, resume=False)
        return folder, "trained"


def _run(execute: Execute, need: Need, cfg: DictConfig, folder: Path, resume: bool) -> None:
    code = execute(need.command, cfg, folder, resume=resume)
    if code == 130:
        raise Interrupted(f"stopped while the {need.role} trained; `modrun resume` continues both")
    if code != 0:
        raise RuntimeError(f"{need.role} training failed; see {folder}/log.txt")


def _status(folder: Path) -> dict[str, Any]:
    try:
        status = read_json(folder / "status.json")
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def _completed(folder: Path) -> bool:
    return _status(folder).get("state") == "completed" and run_weights(folder).is_file()


def _live_elsewhere(status: dict[str, Any]) -> bool:
    """A `running` run that may really be running: on another host (its pid says nothing here), or alive here."""
    return status.get("host") != socket.gethostname() or alive(status.get("pid"))


def _read_record(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / RECORD
    if not path.is_file():
        return []
    try:
        records = read_json(path, list)
    except (OSError, ValueError):
        return []
    return (
        [r for r in records if isinstance(r, dict) and {"key", "run", "sha256"} <= set(r)]
        if isinstance(records, list)
        else []
    )
