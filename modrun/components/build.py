"""Components from config nodes: the device, the data, a registered model (also the one a run folder trained),
its cost."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from modrun.components.data import RUNNER_KEYS
from modrun.components.data.base import Data
from modrun.components.data.loader import load_in_memory
from modrun.components.shapes import apply_shapes, read_shapes
from modrun.core import cost
from modrun.core.artifacts import load_into, load_run_config, load_state, run_weights
from modrun.core.errors import UserError
from modrun.core.registry import DATASETS, MODELS


def cost_report(model: nn.Module, data: Data, device: torch.device) -> dict[str, Any]:
    example = data.example(1, device)  # images: C x H x W; text: a window of block_size tokens
    return {
        **cost.count_params(model),
        "macs": cost.count_macs(model, example),
        "latency_ms_batch1": cost.latency_ms(model, example),
        "latency_device": str(device),
    }


def build_model(node: DictConfig, data: Data | None = None, path: str = "model") -> nn.Module:
    """The registered model of `node`; with `data`, first check that it takes that data's shape."""
    if data is not None:
        for key, have in (
            ("in_channels", data.channels),
            ("num_classes", data.num_classes),
            ("image_size", data.image_size),
        ):
            want = node.get(key)
            if want is not None and int(want) != have:
                raise UserError(f"{path}.{key}={want} does not fit the data, which has {key.split('_')[-1]}={have}")
        if node.get("vocab_size") is not None and int(node.vocab_size) != data.vocab_size:
            raise UserError(
                f"{path}.vocab_size={node.vocab_size} does not fit the data's vocabulary ({data.vocab_size})"
            )
        if node.get("block_size") is not None and data.block_size > int(node.block_size):
            raise UserError(
                f"data.block_size={data.block_size} is longer than {path}.block_size={node.block_size}; "
                f"set data.block_size<={node.block_size} or {path}.block_size={data.block_size}"
            )
    return MODELS.get(node.name)(**component_args(node))


def build_data(cfg: DictConfig) -> Data:
    builder = DATASETS.get(cfg.data.name)
    data = builder(**builder_args(builder, cfg.data, RUNNER_KEYS))
    # file-backed splits that fit the budget are decoded once and then batched by index, like digits
    data = load_in_memory(data, float(cfg.data.get("in_memory_mb", 1024)), int(cfg.data.get("num_workers", 0)))
    for key in ("channels", "num_classes", "image_size", "vocab_size"):
        want = cfg.data.get(key)
        if want is not None and int(want) != getattr(data, key):
            raise UserError(
                f"data.{key}={want} but dataset '{cfg.data.name}' has {getattr(data, key)}; "
                f"set data.{key}={getattr(data, key)}"
            )
    return data


def builder_args(builder: Callable, node: DictConfig, runner_keys: set[str]) -> dict[str, Any]:
    """The node's keys meant for `builder`: its own keys plus runner keys that its signature names."""
    accepted = inspect.signature(builder).parameters
    return {k: v for k, v in component_args(node).items() if k not in runner_keys or k in accepted}


def component_args(node: DictConfig, skip: set[str] = frozenset({"name"})) -> dict[str, Any]:
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in skip}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name}: CUDA is not available on this machine — did you mean device=cpu?")
    return device


def model_from_run(run: str | Path, data: Data, device: torch.device, key: str) -> tuple[nn.Module, dict]:
    """The model a completed run folder trained, with its final weights."""

    run = Path(run)
    cfg, status = load_run_config(run)
    if status.get("state") != "completed":
        raise UserError(f"{key}={run}: that run is {status.get('state')}, not completed; resume it first")
    if not run_weights(run).exists():
        raise UserError(f"{key}={run}: that run has no {run_weights(run).name}")
    want = cfg.model.get("vocab_size")
    if isinstance(want, int) and data.vocab_size and want != data.vocab_size:  # teacher and student share tokens
        theirs = OmegaConf.select(cfg, "data.tokenizer", default=None) or "byte-level"
        raise UserError(
            f"{key}={run}: its model reads {want} tokens (tokenizer: {theirs}) but this data has {data.vocab_size} "
            f"(tokenizer: {data.tokenizer}); use the data and data.tokenizer that run was trained on"
        )
    model = build_model(cfg.model, data, path=f"{key} model")
    shapes = read_shapes(run)
    if shapes:  # a structurally pruned run: rebuild its smaller layers before loading the weights
        apply_shapes(model, shapes)
    load_into(model, load_state(run_weights(run)), str(run))
    return model.to(device), {"source": "run", "run": str(run), "model": OmegaConf.to_container(cfg.model)}
