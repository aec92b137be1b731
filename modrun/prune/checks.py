"""Checks only `modrun prune` needs, before any work: the source model, recovery, layer selection."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from modrun.prune.context import LAYER_TYPES

RECOVER = ("none", "finetune", "distill")


def check(cfg: DictConfig) -> list[str]:
    errors = []
    s = cfg.source
    if s.run and not (Path(s.run) / "config.yaml").is_file():
        errors.append(f"source.run={s.run}: not a modrun run folder (no config.yaml)")
    if s.checkpoint and not Path(s.checkpoint).is_file():
        errors.append(f"source.checkpoint={s.checkpoint}: no such file")
    if s.run and s.checkpoint:
        errors.append("source.run and source.checkpoint are both set; give one")
    if cfg.recover.name not in RECOVER:
        errors.append(f"recover.name={cfg.recover.name}: expected one of {', '.join(RECOVER)}")
    if cfg.recover.name == "none" and cfg.prune.name in ("gradual_magnitude", "imp"):
        errors.append(f"prune={cfg.prune.name} prunes during training; use recover=finetune or recover=distill")
    for t in cfg.prune.types:
        if t not in LAYER_TYPES:
            errors.append(f"prune.types: unknown layer type {t} (valid: {', '.join(LAYER_TYPES)})")
    if cfg.recover.name == "distill" and not errors:
        from modrun.distill.checks import check_layers

        teacher = OmegaConf.load(Path(s.run) / "config.yaml").model if s.run else cfg.model
        errors += check_layers(cfg, [teacher])
    return errors
