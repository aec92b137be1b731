"""Weights and records that runs leave behind and others read: safetensors/.pt weights (never unpickling code),
whether they fit a model, a run folder's config and status."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from modrun.core import checkpoint
from modrun.core import collectives as distributed
from modrun.core.errors import UserError
from modrun.core.records import read_text
from modrun.core.runfolder import PREREQUISITES, atomic_write, read_json


def load_run_config(run_dir: Path) -> tuple[DictConfig, dict]:
    """config.yaml and status.json of an existing run folder, or a clear error."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "status.json").is_file():
        raise UserError(f"'{run_dir}' is not a modrun run folder (no config.yaml/status.json)")
    try:
        cfg = OmegaConf.create(read_text(run_dir / "config.yaml"))
        status = read_json(run_dir / "status.json", (dict, list, str, int, float, bool, type(None)))
    except Exception as e:  # noqa: BLE001 - a damaged record (YAML/JSON errors, unreadable files) is bad input
        detail = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"'{run_dir}': cannot read config.yaml/status.json ({detail})") from None
    if not isinstance(cfg, DictConfig) or not isinstance(status, dict):
        raise UserError(f"'{run_dir}': config.yaml or status.json does not hold a mapping")
    problem = record_problem(cfg)
    if problem:
        raise UserError(f"{run_dir / 'config.yaml'}: {problem}")
    if not isinstance(status.get("command"), str):
        raise UserError(f'{run_dir / "status.json"}: names no command (expected e.g. "command": "train")')
    return cfg, status


def record_problem(cfg: DictConfig) -> str | None:
    """What makes a recorded config unusable before any key is read: empty, a `_target_` (an import path),
    a malformed `imports`."""
    if len(cfg) == 0:
        return "empty (a run folder's config.yaml holds the whole resolved config)"
    path = _target_path(OmegaConf.to_container(cfg, resolve=False), "")
    if path is not None:
        return f"{path}: modrun builds components by registered name, never from an import path (_target_)"
    imports = cfg.get("imports")
    if imports is not None and (not isinstance(imports, ListConfig) or not all(isinstance(m, str) for m in imports)):
        return f"imports={imports}: expects a list of module names"
    return None


def _target_path(tree: Any, prefix: str) -> str | None:
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else []
    for key, value in items:
        path = f"{prefix}.{key}" if prefix else str(key)
        if key == "_target_":
            return path
        found = _target_path(value, path)
        if found is not None:
            return found
    return None


def tied_keys(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Keys whose tensor shares storage with an earlier key's (tied embeddings): {alias: first key}."""
    first: dict[tuple[int, int], str] = {}
    aliases = {}
    for k, v in state.items():
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        if ptr is None:
            continue
        if ptr in first:
            aliases[k] = first[ptr]
        else:
            first[ptr] = k
    return aliases


def save_weights(run_dir: Path, model: nn.Module) -> None:
    """model.safetensors: one copy of each tensor (a tied matrix once; load_into restores the ties)."""
    if not distributed.is_main():  # data-parallel: every process holds the same weights; rank 0 writes
        return
    state = model.state_dict()
    aliases = tied_keys(state)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if k not in aliases}
    atomic_write(run_dir / "model.safetensors", save(tensors))


def prerequisite(run_dir: Path, key: str) -> dict | None:
    """How the run in config key `key` (e.g. teacher.run) was provided: the record of prerequisites.json, or None
    when the user gave it."""
    path = Path(run_dir) / PREREQUISITES
    try:
        records = read_json(path, list) if path.is_file() else []
    except (OSError, ValueError):
        return None
    return next((r for r in records if isinstance(r, dict) and r.get("key") == key), None)


def prerequisite_record(role: str, key: str, run: Path, how: str, semantic_key: str | None) -> dict[str, Any]:
    """One entry of prerequisites.json: a run this run needed first, how it was found, and its weights' SHA-256."""
    return {"role": role, "key": key, "run": str(run), "how": how, "semantic_key": semantic_key,
            "sha256": sha256(run_weights(run))}  # fmt: skip


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_weights(run: Path) -> Path:
    return Path(run) / "model.safetensors"


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Load `state` strictly; a tied tensor saved once (save_weights) fills its aliases."""
    aliases = {k: v for k, v in tied_keys(model.state_dict()).items() if k not in state and v in state}
    state = {**state, **{k: state[v] for k, v in aliases.items()}}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise UserError(f"weights in {source} do not fit the model: {detail}") from None
    return model


def fit_problem(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Why weights of these shapes do not load into `model` (strictly, like load_state_dict), or None."""
    state = model.state_dict()
    want = {k: tuple(v.shape) for k, v in state.items()}
    tied = tied_keys(state)  # saved once: an alias of a present key is not missing
    missing = [k for k in want if k not in shapes and tied.get(k) not in shapes]
    unexpected = [k for k in shapes if k not in want]
    wrong = [f"{k} {shapes[k]} vs {want[k]}" for k in want if k in shapes and shapes[k] != want[k]]
    parts = [
        f"{what} {len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        if keys
    ]
    return "; ".join(parts) or None


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a weights file; a .safetensors file is read by its header alone."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - not a safetensors file
            raise UserError(f"cannot read weights from '{path}': {str(e).splitlines()[0]}") from None
    state = load_state(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"'{path}' holds no state dict (a mapping of names to tensors)")
    return {k: tuple(v.shape) for k, v in state.items()}


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """Weights from .safetensors, or from a .pt/.pth (a state dict or a modrun checkpoint), never unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no weights file '{path}'")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except Exception as e:  # noqa: BLE001 - SafetensorError and friends: a file that is not safetensors
            raise UserError(f"cannot read weights from '{path}': {str(e).splitlines()[0]}") from None

    state = checkpoint.load(path, "cpu")  # its checksum when it has one; weights_only: bad files are UserErrors
    if isinstance(state, dict) and "modules" in state:
        state = state["modules"]["model"]
    elif isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return state
