"""Teachers: from a run folder, from a weights file plus a `model@teacher` config, or trained on the fly
(through the train pipeline, into a run folder of its own that later distillations find and reuse)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from modrun.data.base import Data
from modrun.errors import UserError
from modrun.prune.shapes import apply_shapes, read_shapes
from modrun.runs import read_json, reserve_run_dir

log = logging.getLogger("modrun")
TEACHER_KEYS = {"run", "checkpoint", "seed"}  # the rest of the teacher node is its model config


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """Weights from .safetensors, or from a .pt/.pth (a state dict or a modrun checkpoint), never unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no weights file '{path}'")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:  # noqa: BLE001 - SafetensorError and friends: a file that is not safetensors
            raise UserError(f"cannot read weights from '{path}': {str(e).splitlines()[0]}") from None
    from modrun import checkpoint

    state = checkpoint.load(path, "cpu")  # its checksum when it has one; weights_only: bad files are UserErrors
    if isinstance(state, dict) and "modules" in state:
        state = state["modules"]["model"]
    elif isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return state


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a weights file; a .safetensors file is read by its header alone."""
    path = Path(path)
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - not a safetensors file
            raise UserError(f"cannot read weights from '{path}': {str(e).splitlines()[0]}") from None
    state = load_state(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"'{path}' holds no state dict (a mapping of names to tensors)")
    return {k: tuple(v.shape) for k, v in state.items()}


def fit_problem(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Why weights of these shapes do not load into `model` (strictly, like load_state_dict), or None."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in want if k not in shapes]
    unexpected = [k for k in shapes if k not in want]
    wrong = [f"{k} {shapes[k]} vs {want[k]}" for k in want if k in shapes and shapes[k] != want[k]]
    parts = [
        f"{what} {len(keys)} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        if keys
    ]
    return "; ".join(parts) or None


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise UserError(f"weights in {source} do not fit the model: {detail}") from None
    return model


def run_weights(run: Path) -> Path:
    return Path(run) / "model.safetensors"


def model_from_run(run: str | Path, data: Data, device: torch.device, key: str) -> tuple[nn.Module, dict]:
    """The model a completed run folder trained, with its final weights."""
    from modrun.pipelines.common import build_model, load_run_config

    run = Path(run)
    cfg, status = load_run_config(run)
    if status.get("state") != "completed":
        raise UserError(f"{key}={run}: that run is {status.get('state')}, not completed; resume it first")
    if not run_weights(run).exists():
        raise UserError(f"{key}={run}: that run has no {run_weights(run).name}")
    model = build_model(cfg.model, data, path=f"{key} model")
    shapes = read_shapes(run)
    if shapes:  # a structurally pruned run: rebuild its smaller layers before loading the weights
        apply_shapes(model, shapes)
    load_into(model, load_state(run_weights(run)), str(run))
    return model.to(device), {"source": "run", "run": str(run), "model": OmegaConf.to_container(cfg.model)}


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def reference_train_config(cfg: DictConfig, model: dict, seed: int, name: str, epochs: int | None = None) -> DictConfig:
    """The train config of a model that a run needs first (a teacher, a model to prune): this run's data,
    optimiser, schedule and trainer, with its own model and seed."""
    keys = ["data", "optim", "sched", "trainer", "logger", "device", "runs_dir", "imports"]
    tcfg = {"model": model, **{k: cfg[k] for k in keys if k in cfg}, "seed": seed, "name": name}
    if epochs is not None:
        tcfg["trainer"] = OmegaConf.merge(cfg.trainer, {"epochs": epochs})
    return OmegaConf.create(OmegaConf.to_container(OmegaConf.create(tcfg), resolve=True))


def train_or_reuse(cfg: DictConfig, model: dict, seed: int, name: str, role: str, epochs: int | None = None) -> Path:
    """Train that model, or find the run that already did with the same resolved config and reuse it."""
    from modrun.launch import _alive
    from modrun.pipelines.common import execute, write_record

    tcfg = reference_train_config(cfg, model, seed, name, epochs)
    wanted = OmegaConf.to_container(tcfg)
    for run in sorted((Path(cfg.runs_dir) / "train").glob("*/config.yaml"), reverse=True):
        if OmegaConf.to_container(OmegaConf.load(run)) != wanted or not (run.parent / "status.json").exists():
            continue
        if (run.parent / "reproduces.json").exists():  # a reproduction checks the run it copies; reuse that one
            continue
        status = read_json(run.parent / "status.json")
        if status.get("state") == "completed" and run_weights(run.parent).exists():
            log.info(f"{role}: reusing {run.parent} (same resolved config, completed)")
            return run.parent
        if status.get("state") == "running" and _alive(status.get("pid")):
            raise UserError(f"the {role} run {run.parent} is being trained by pid {status['pid']}; wait for it")
        log.info(f"{role}: resuming the unfinished {role} run {run.parent}")
        if execute("train", tcfg, run.parent, resume=True) != 0:
            raise RuntimeError(f"{role} training failed; see {run.parent}/log.txt")
        return run.parent
    run = reserve_run_dir(Path(cfg.runs_dir), "train", name)
    log.info(f"{role}: none given, training {model['name']} first in {run}")
    write_record(run, tcfg, "train", [])
    if execute("train", tcfg, run) != 0:
        raise RuntimeError(f"{role} training failed; see {run}/log.txt")
    return run


def ensure_teacher_run(cfg: DictConfig) -> Path:
    """The run folder of the teacher trained on the fly (trained now, or found and reused)."""
    node = teacher_model_node(cfg)
    return train_or_reuse(cfg, node, int(cfg.teacher.seed), f"teacher_{node['name']}_{cfg.data.name}", "teacher")


def teacher_model_node(cfg: DictConfig) -> dict:
    return {k: v for k, v in OmegaConf.to_container(cfg.teacher, resolve=True).items() if k not in TEACHER_KEYS}


def load_teachers(cfg: DictConfig, data: Data, device: torch.device) -> tuple[list[nn.Module], list[dict[str, Any]]]:
    """Every teacher of a distillation, frozen, with a record of where each came from."""
    from modrun.pipelines.common import build_model

    t = cfg.teacher
    runs = list(t.run) if isinstance(t.run, ListConfig) else ([t.run] if t.run else [])
    teachers, records = [], []
    if runs:
        for run in runs:
            model, record = model_from_run(run, data, device, "teacher.run")
            teachers.append(model)
            records.append({**record, "weights_sha256": _sha256(run_weights(run))})
    elif t.checkpoint:
        node = OmegaConf.create({k: v for k, v in t.items() if k not in TEACHER_KEYS})
        model = load_into(build_model(node, data, path="teacher"), load_state(t.checkpoint), str(t.checkpoint))
        teachers.append(model.to(device))
        records.append(
            {
                "source": "checkpoint",
                "checkpoint": str(t.checkpoint),
                "model": OmegaConf.to_container(node),
                "weights_sha256": _sha256(Path(t.checkpoint)),
            }
        )
    else:
        run = ensure_teacher_run(cfg)
        model, record = model_from_run(run, data, device, "teacher.run")
        teachers.append(model)
        records.append({**record, "source": "trained", "weights_sha256": _sha256(run_weights(run))})
    for model in teachers:
        model.eval().requires_grad_(False)
    return teachers, records
