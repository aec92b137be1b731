"""Checks of the `nested` node and of in-place distillation (`kd` in `modrun train`), before any work: the
values alone, then against the model built on the meta device (validation) or the real one (pipeline)."""

from __future__ import annotations

from omegaconf import DictConfig, ListConfig
from torch import nn

from modrun.components.drybuild import build_on_meta
from modrun.core.errors import UserError
from modrun.core.values import is_number
from modrun.methods.distill.checks import check_kd_values
from modrun.methods.nested.base import block_stages, classifier, depths, exits, keep_blocks, sizes
from modrun.methods.nested.exits import exit_blocks

LOGIT_METHODS = ("kd", "dkd", "dist", "logit_std")  # the KD methods in-place distillation can use
MODES = ("sum", "sample")
HOOKS = {"sorted": "masks widths", "exits": "reads the exits' hidden states"}


def _fractions(key: str, values: object, what: str) -> list[str]:
    if not isinstance(values, (list, ListConfig)) or not values or not all(is_number(v) and 0 < v <= 1 for v in values):
        return [f"{key}={values}: a list of {what}, each in (0, 1]"]
    return []


def check_values(node: DictConfig) -> list[str]:
    """The nested node's own values: fractions in (0, 1], whole dims, a known mode."""
    if node.name == "sorted":
        errors = _fractions("nested.widths", node.get("widths"), "widths")
        wanted = node.get("depths")
        errors += _fractions("nested.depths", wanted if wanted is not None else [1.0], "depths")
        if node.get("mode") not in MODES:
            errors.append(f"nested.mode={node.get('mode')}: expected one of {', '.join(MODES)}")
        return errors
    if node.name == "exits":
        wanted, errors = node.get("exits"), []
        if wanted is not None and not (
            isinstance(wanted, (list, ListConfig))
            and wanted
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in wanted)
        ):
            errors.append(f"nested.exits={_show(wanted)}: null (every depth) or a list of block counts >= 1")
        elif wanted is not None and list(wanted) != sorted(set(wanted)):
            errors.append(f"nested.exits={_show(wanted)}: block counts must increase, e.g. {sorted(set(wanted))}")
        if node.get("mode") not in MODES:
            errors.append(f"nested.mode={node.get('mode')}: expected one of {', '.join(MODES)}")
        return errors
    if node.name == "matryoshka":
        dims = node.get("dims")
        whole = isinstance(dims, (list, ListConfig)) and all(
            isinstance(d, int) and not isinstance(d, bool) for d in dims
        )
        return [] if whole and dims else [f"nested.dims={dims}: a list of whole numbers (embedding sizes)"]
    return []


def check(cfg: DictConfig, model: nn.Module) -> None:
    """The nested node against the model: raise UserError naming the first problem."""
    node = cfg.nested
    errors = check_values(node)
    if errors:
        raise UserError(*errors)
    if node.name == "sorted":
        narrower = any(float(w) < 1 for w in node.widths)
        if narrower and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
            raise UserError(f"nested=sorted slices channels at BatchNorm layers; model {cfg.model.name} has none")
        wanted = [d for d in depths(node) if d < 1]
        stages = block_stages(model) if hasattr(model, "depth_config") else []
        if wanted and not stages:
            raise UserError(
                f"nested.depths={list(node.depths)}: model {cfg.model.name} has no residual stages to shorten "
                "(`block_stages` and `depth_config`, as the resnets have)"
            )
        if stages:
            blocks = [keep_blocks(len(stages[0]), d) for d in depths(node)]
            if len(set(blocks)) < len(blocks):
                raise UserError(
                    f"nested.depths={list(node.depths)}: two depths keep the same number of blocks per stage "
                    f"({len(stages[0])} blocks: depths keep {blocks})"
                )
    elif node.name == "exits":
        blocks = len(exit_blocks(model, cfg.model.name))
        wanted = node.get("exits")
        if wanted is not None and max(wanted) > blocks:
            raise UserError(
                f"nested.exits={_show(wanted)}: model {cfg.model.name} has {blocks} blocks; exits 1..{blocks}"
            )
        if cfg.get("kd") is not None and len(exits(node, blocks)) < 2:
            raise UserError(f"kd: nested.exits={_show(wanted)} is only the full depth; there is no exit to teach")
    elif node.name == "matryoshka":
        fc = classifier(model)
        dims = list(node.dims)
        if any(not 0 < int(d) <= fc.in_features for d in dims):
            raise UserError(f"nested.dims={dims}: each must be in 1..{fc.in_features} (the embedding size)")


def check_kd(cfg: DictConfig) -> list[str]:
    """`modrun train` takes the kd group only for in-place distillation between nested sizes."""
    kd = cfg.get("kd")
    if kd is None:
        return []
    node = cfg.get("nested")
    if node is None or node.name not in ("sorted", "exits"):
        return [
            "kd: modrun train distils in place only between the sizes of nested=sorted or nested=exits (the full "
            "model teaches the others); to learn from a teacher, use modrun distill"
        ]
    errors = []
    if node.name == "sorted" and len(sizes(node)) < 2:  # exits: counted against the model's depth in check()
        errors.append(
            "kd: nested=sorted with only the full size (widths and depths [1.0]) has no smaller size to teach"
        )
    for key, term in (kd.get("terms") or {}).items():
        name = term.get("name", key)
        if name not in LOGIT_METHODS or "student_layer" in term or "teacher_layer" in term:
            errors.append(
                f"kd.terms.{key} ({name}): in-place distillation takes logit methods: {', '.join(LOGIT_METHODS)}"
            )

    return errors + check_kd_values(cfg)


def check_train(cfg: DictConfig) -> list[str]:
    """Validation of `modrun train`: the nested node (against the model on the meta device) and kd."""
    node = cfg.get("nested")
    if node is None or node.name == "none":
        return check_kd(cfg)
    errors = check_values(node)  # first: the kd check counts the sizes
    if errors:
        return errors
    errors = check_kd(cfg)
    if node.name in ("sorted", "exits") and cfg.trainer.get("compile"):
        errors.append(
            f"trainer.compile=true: nested={node.name} {HOOKS[node.name]} with hooks that a compiled graph does "
            "not see; set trainer.compile=false"
        )
    try:
        check(cfg, build_on_meta(cfg.model))
    except UserError as e:
        errors += e.messages
    except NotImplementedError:
        pass  # an operation without a meta kernel: the pipeline checks the real model
    return errors


def _show(value: object) -> object:
    return list(value) if isinstance(value, ListConfig) else value
