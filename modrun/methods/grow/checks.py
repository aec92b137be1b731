"""Checks only `modrun grow` needs, before any work: the method, its factor, the source and whether it can grow."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from modrun.core.errors import did_you_mean
from modrun.methods.grow import GROWERS, factor_problem, unsupported

ORDERS = ("repeat", "interleave")


def check(cfg: DictConfig) -> list[str]:
    errors = []
    s, g = cfg.source, cfg.grow
    if s.run and not (Path(s.run) / "config.yaml").is_file():
        errors.append(f"source.run={s.run}: not a modrun run folder (no config.yaml)")
    elif s.run and (Path(s.run) / "model_shapes.json").is_file():
        errors.append(f"source.run={s.run}: a channel-pruned model (model_shapes.json) cannot be grown")
    if s.checkpoint and not Path(s.checkpoint).is_file():
        errors.append(f"source.checkpoint={s.checkpoint}: no such file")
    if s.run and s.checkpoint:
        errors.append("source.run and source.checkpoint are both set; give one")
    if g.name not in GROWERS:
        return [*errors, f"grow.name={g.name}: no such growth method{did_you_mean(str(g.name), GROWERS)}"]
    if g.name == "stack" and g.get("order") not in ORDERS:
        errors.append(f"grow.order={g.get('order')}: expected repeat or interleave{did_you_mean(str(g.order), ORDERS)}")
    if errors:
        return errors
    node = source_node(cfg)
    problem = unsupported(str(g.name), node)
    where = f" (the model of source.run={s.run})" if s.run else ""
    if problem:
        return [problem + where]
    problem = factor_problem(str(g.name), node, g.factor)
    return [problem + where] if problem else []


def source_node(cfg: DictConfig) -> dict:
    """The source's model config: from its run folder, else source.model."""
    if cfg.source.run:
        return OmegaConf.to_container(OmegaConf.load(Path(cfg.source.run) / "config.yaml").model, resolve=True)
    return OmegaConf.to_container(cfg.source.model, resolve=True)
