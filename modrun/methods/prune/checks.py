"""Checks only `modrun prune` needs, before any work: the source model, recovery, layer selection."""

from __future__ import annotations

# imports inside functions here defer torch: validation runs these checks before torch is loaded
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from modrun.components.shapes import apply_shapes, read_shapes
from modrun.core.errors import UserError
from modrun.methods.prune.context import LAYER_TYPES

RECOVER = ("none", "finetune", "distill")


def check(cfg: DictConfig) -> list[str]:
    from modrun.methods.distill.checks import checkpoint_problems, run_source

    errors = []
    s = cfg.source
    source = cfg.model  # the model that is pruned: this config's, or that of source.run
    if s.run:
        node, errors = run_source(s.run, "source.run")
        source = node if node is not None else source
    if s.checkpoint:
        errors += checkpoint_problems(s.checkpoint, cfg.model, "source.checkpoint")
    if s.run and s.checkpoint:
        errors.append("source.run and source.checkpoint are both set; give one")
    if cfg.recover.name not in RECOVER:
        errors.append(f"recover.name={cfg.recover.name}: expected one of {', '.join(RECOVER)}")
    if cfg.recover.name == "none" and cfg.prune.name in ("gradual_magnitude", "imp"):
        errors.append(f"prune={cfg.prune.name} prunes during training; use recover=finetune or recover=distill")
    for t in cfg.prune.types:
        if t not in LAYER_TYPES:
            errors.append(f"prune.types: unknown layer type {t} (valid: {', '.join(LAYER_TYPES)})")
    if cfg.recover.name == "distill":
        from modrun.methods.distill.checks import check_kd_values

        errors += check_kd_values(cfg)
    if not errors:
        errors += pruner_problems(cfg, source, read_shapes(Path(s.run)) if s.run else None)
    if cfg.recover.name == "distill" and not errors:
        from modrun.methods.distill.checks import check_layers

        errors += check_layers(cfg, [source])  # the teacher is the unpruned source model
    return errors


def pruner_problems(cfg: DictConfig, node: DictConfig, shapes: dict | None) -> list[str]:
    """Build the pruner on the source model, on the meta device: its arguments (sparsity in [0, 1), a
    schedule, a layer selection that matches nothing) are checked before a source model is trained."""
    import torch

    from modrun.components.data.base import example_input
    from modrun.components.drybuild import build_on_meta
    from modrun.core.registry import PRUNERS
    from modrun.methods.prune import RUNNER_KEYS
    from modrun.methods.prune.context import PruneContext, select_layers

    p, d = cfg.prune, cfg.data
    try:
        model = build_on_meta(node)
        if shapes:  # a channel-pruned source run: its smaller layers
            with torch.device("meta"):
                apply_shapes(model, shapes)
    except Exception:  # noqa: BLE001 - the model's own arguments are reported by the build check
        return []
    try:
        targets = select_layers(model, list(p.include), list(p.exclude), list(p.types))
        args = {k: v for k, v in OmegaConf.to_container(p, resolve=True).items() if k not in RUNNER_KEYS}
        text = d.get("task") == "language_modeling"
        sizes = [int(d.get(k) or 0) for k in ("channels", "image_size", "block_size")]
        example = example_input(str(d.get("task")), 1, "meta", *sizes)
        classes = d.get("vocab_size") if text else d.num_classes
        ctx = PruneContext(model, targets, int(cfg.seed), example, int(classes), Path(str(cfg.runs_dir)).expanduser())
        with torch.random.fork_rng(devices=[]):  # a pruner may seed the global generator: leave it as it was
            PRUNERS.get(p.name)(ctx, **args)
    except UserError as e:
        return e.messages
    except Exception as e:  # noqa: BLE001 - whatever the pruner refuses is bad input
        return [f"prune: pruner '{p.name}' refuses these arguments ({type(e).__name__}: {str(e).splitlines()[0]})"]
    return []
