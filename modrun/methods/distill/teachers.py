"""Teachers: from run folders or from a weights file plus a `model@teacher` config. With neither, the runner
finds or trains one first (modrun.runner.prerequisites) and hands its folder in as teacher.run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from modrun.components.build import build_model, model_from_run
from modrun.components.data.base import Data
from modrun.core.artifacts import load_into, load_state, run_weights, sha256
from modrun.core.errors import UserError

log = logging.getLogger("modrun")
TEACHER_KEYS = {"run", "checkpoint", "seed", "epochs", "overrides"}  # the rest of the teacher node is its model config


def teacher_model_node(cfg: DictConfig) -> dict:
    return {k: v for k, v in OmegaConf.to_container(cfg.teacher, resolve=True).items() if k not in TEACHER_KEYS}


def own_training(node: DictConfig, owner: str = "teacher") -> list[str]:
    """The train overrides of a run trained first (teacher, source): its seed, epochs and own overrides; the rest
    comes from `modrun train`'s defaults, never from the run that needs it."""
    seed, epochs = (_whole(node, key, owner) for key in ("seed", "epochs"))
    return [
        f"seed={seed or 0}",
        *([f"trainer.epochs={epochs}"] if epochs is not None else []),
        *[str(o) for o in node.get("overrides") or []],
    ]


def _whole(node: DictConfig, key: str, owner: str) -> int | None:
    value = node.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise UserError(f"{owner}.{key}={value}: expects a whole number >= 0 (or null)")
    return value


def load_teachers(
    cfg: DictConfig, data: Data, device: torch.device, trained: bool = False
) -> tuple[list[nn.Module], list[dict[str, Any]]]:
    """Every teacher of a distillation, frozen, with a record of where each came from."""

    t = cfg.teacher
    runs = list(t.run) if isinstance(t.run, ListConfig) else ([t.run] if t.run else [])
    teachers, records = [], []
    if runs:
        for run in runs:
            model, record = model_from_run(run, data, device, "teacher.run")
            teachers.append(model)
            records.append({**record, "weights_sha256": sha256(run_weights(run))})
            if trained:  # none was given: the runner found or trained it (prerequisites.json says which)
                records[-1]["source"] = "trained"
    elif t.checkpoint:
        node = OmegaConf.create({k: v for k, v in t.items() if k not in TEACHER_KEYS})
        model = load_into(build_model(node, data, path="teacher"), load_state(t.checkpoint), str(t.checkpoint))
        teachers.append(model.to(device))
        records.append(
            {
                "source": "checkpoint",
                "checkpoint": str(t.checkpoint),
                "model": OmegaConf.to_container(node),
                "weights_sha256": sha256(Path(t.checkpoint)),
            }
        )
    else:
        raise UserError(
            "no teacher: give teacher.run or teacher.checkpoint (the runner trains one when neither is set)"
        )
    for model in teachers:
        model.eval().requires_grad_(False)
    return teachers, records
