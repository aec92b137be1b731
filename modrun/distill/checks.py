"""Checks only `modrun distill` needs, before any work: teacher sources, layer paths, the teacher cache."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from modrun.errors import UserError


def check(cfg: DictConfig) -> list[str]:
    from modrun.pipelines.distill import check_cache

    errors = check_cache(cfg)
    t = cfg.teacher
    runs = list(t.run) if isinstance(t.run, ListConfig) else ([t.run] if t.run else [])
    teacher_nodes = []
    for run in runs:
        if not (Path(run) / "config.yaml").is_file():
            errors.append(f"teacher.run={run}: not a modrun run folder (no config.yaml)")
        else:
            teacher_nodes.append(OmegaConf.load(Path(run) / "config.yaml").model)
    if t.checkpoint and not Path(t.checkpoint).is_file():
        errors.append(f"teacher.checkpoint={t.checkpoint}: no such file")
    if t.run and t.checkpoint:
        errors.append("teacher.run and teacher.checkpoint are both set; give one")
    if cfg.kd.teacher_mode not in ("mean", "each"):
        errors.append(f"kd.teacher_mode={cfg.kd.teacher_mode}: expected mean or each")
    if not runs:
        teacher_nodes = [OmegaConf.create({k: v for k, v in t.items() if k not in ("run", "checkpoint", "seed")})]
    if not errors:
        errors += check_layers(cfg, teacher_nodes)
    return errors


def check_layers(cfg: DictConfig, teacher_nodes: list[DictConfig]) -> list[str]:
    """Layer paths of every KD term, checked against the models built on the meta device (no memory, no time)."""
    import torch

    from modrun.distill.capture import resolve_layers
    from modrun.pipelines.common import component_args
    from modrun.registry import MODELS

    def build(node: DictConfig) -> torch.nn.Module:
        with torch.device("meta"):
            return MODELS.get(node.name)(**component_args(node, {"name", "run", "checkpoint", "seed"}))

    errors = []
    try:
        student, teachers = build(cfg.model), [build(n) for n in teacher_nodes]
    except Exception as e:  # noqa: BLE001 - a model that cannot be built is reported, not raised
        return [f"model: cannot build ({type(e).__name__}: {e})"]
    if cfg.kd.get("m2m") is not None:
        errors += _check_m2m(cfg, student, teachers[0])
    for key, term in (cfg.kd.terms or {}).items():
        for role, models in (("student_layer", [student]), ("teacher_layer", teachers)):
            for model in models:
                try:
                    resolve_layers(model, term.get(role), f"kd.terms.{key}.{role}")
                except UserError as e:
                    errors += e.messages
    return sorted(set(errors), key=errors.index)


def _check_m2m(cfg: DictConfig, student, teacher) -> list[str]:  # noqa: ANN001
    """m2m stages checked on meta tensors: no memory, no time."""
    import torch

    from modrun.distill.capture import resolve_layers
    from modrun.distill.m2m import stage_problems

    try:
        s_paths = resolve_layers(student, cfg.kd.m2m.student_stages, "kd.m2m.student_stages")
        t_paths = resolve_layers(teacher, cfg.kd.m2m.teacher_stages, "kd.m2m.teacher_stages")
    except UserError as e:
        return e.messages
    size, channels = int(cfg.data.image_size), int(cfg.data.channels)
    return stage_problems(student, teacher, s_paths, t_paths, torch.zeros(2, channels, size, size, device="meta"))
