"""Merging fine-tuned runs through their task vectors: `soup=task_arithmetic` (Ilharco et al. 2023), `ties`,
`dare` (how the vectors combine: vectors.py), each optionally with LiNeS layer scaling.

Each fine-tuned run i defines a task vector tau_i = theta_i - theta_base against the common base it started
from; the merged model is theta_base + scale * (layer scale) * (LiNeS scale) * tau, tau the vectors combined.
The layer scale of a tensor is that of the longest module-path prefix listed in `layer_scales` (1.0 when none
matches). With `scale=null` the scale is chosen on the validation split from `scale_grid`, as the papers do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from modrun.core.errors import UserError
from modrun.core.summary import direction_of
from modrun.methods.soup import vectors

log = logging.getLogger("modrun")


def find_base(cfg: DictConfig, ings: list[dict[str, Any]]) -> Path:
    """`base=RUN_DIR`, or the run every ingredient started from (a prune run's source.run)."""
    if cfg.base:
        base = Path(str(cfg.base))
        if not (base / "model.safetensors").is_file():
            raise UserError(f"base={cfg.base}: not a run folder with model.safetensors")
        return base
    sources = {str(OmegaConf.select(ing["cfg"], "source.run", default=None)) for ing in ings}
    if len(sources) == 1 and sources != {"None"}:
        return Path(sources.pop())
    raise UserError(
        f"soup={cfg.soup} needs the runs' common base: base=RUN_DIR "
        "(found automatically only when every run was fine-tuned from the same source.run)"
    )


def check_layer_scales(cfg: DictConfig, base: dict[str, torch.Tensor]) -> None:
    """Every listed module path must hold weights (a typo would silently scale nothing)."""
    for prefix in cfg.layer_scales or {}:
        if not any(k == prefix or k.startswith(f"{prefix}.") for k in base):
            raise UserError(f"layer_scales.{prefix}: no weights under that module path")


def layer_scale(key: str, layer_scales: dict[str, float]) -> float:
    """The scale of the longest listed prefix of a state-dict key (whole path components only)."""
    best, scale = -1, 1.0
    for prefix, value in layer_scales.items():
        if (key == prefix or key.startswith(prefix + ".")) and len(prefix) > best:
            best, scale = len(prefix), float(value)
    return scale


def check_lines(cfg: DictConfig, blocks: tuple[str, ...]) -> None:
    """LiNeS scales by block depth: the model must name its blocks (its feature layers)."""
    if cfg.lines.alpha is not None and not blocks:
        raise UserError("lines.alpha/lines.beta: the runs' model names no blocks (feature layers) to scale by depth")


def combined(cfg: DictConfig, base: vectors.Vector, states: list[vectors.Vector]) -> vectors.Vector:
    """The ingredients' task vectors as one, by the soup's method."""
    taus = vectors.task_vectors(base, states)
    if cfg.soup == "ties":
        return vectors.ties(taus, float(cfg.density))
    if cfg.soup == "dare":
        return vectors.dare(taus, float(cfg.drop_rate), int(cfg.seed))
    return vectors.task_arithmetic(taus)


def merge(
    base: vectors.Vector, tau: vectors.Vector, scale: float, factor: Callable[[str], float]
) -> dict[str, torch.Tensor]:
    """base + scale * factor(key) * tau for float tensors; integer buffers from the base."""
    out = {}
    for key, b in base.items():
        if not b.is_floating_point():
            out[key] = b.clone()
            continue
        out[key] = (b.float() + scale * factor(key) * tau[key]).to(b.dtype)
    return out


def cook(
    cfg: DictConfig,
    rows: list[dict],
    states: list[dict],
    base: dict[str, torch.Tensor],
    score: Any,
    blocks: tuple[str, ...] = (),
    order: list[str] | None = None,
) -> tuple[dict[str, torch.Tensor], float]:
    """The merged weights and the scale used (the best of the grid on val when cfg.scale is null). `order`: the
    model's state-dict keys in its own order (LiNeS places the weights outside the blocks by it)."""
    layer_scales = {str(k): float(v) for k, v in (cfg.layer_scales or {}).items()}
    lines = cfg.lines
    depth = (
        vectors.lines_scale(order or list(base), blocks, float(lines.alpha), float(lines.beta))
        if lines.alpha is not None
        else lambda key: 1.0
    )

    def factor(key: str) -> float:
        return layer_scale(key, layer_scales) * depth(key)

    tau = combined(cfg, base, states)
    if cfg.scale is not None:
        return merge(base, tau, float(cfg.scale), factor), float(cfg.scale)
    higher = direction_of(cfg.objective) == "maximize"
    tried = []
    for s in cfg.scale_grid:
        value = score(merge(base, tau, float(s), factor), ("val",))[cfg.objective]
        tried.append((value if higher else -value, float(s)))
        log.info(f"scale {float(s):g}: {cfg.objective} {value:.4f}")
    chosen = max(tried)[1]  # ties go to the larger scale
    for row in rows:
        row["scale_grid"] = [s for _, s in tried]
    return merge(base, tau, chosen, factor), chosen
