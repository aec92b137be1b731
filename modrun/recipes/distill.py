"""`modrun distill`: a student learns from one or more frozen teachers through weighted KD terms."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from modrun.components.build import build_data, build_model, cost_report, resolve_device
from modrun.components.data.base import Preprocess
from modrun.core.artifacts import prerequisite, save_weights
from modrun.core.checkpoint import seed_everything
from modrun.core.collectives import is_main
from modrun.core.errors import UserError
from modrun.core.runfolder import write_json
from modrun.engine.evaluation import evaluate
from modrun.engine.loop import fit
from modrun.methods.distill.cache import check_cache
from modrun.methods.distill.checks import check
from modrun.methods.distill.m2m import run_phase1
from modrun.methods.distill.objective import DistillObjective
from modrun.methods.distill.teachers import load_teachers, own_training, teacher_model_node
from modrun.recipes.base import Need, Recipe

log = logging.getLogger("modrun")


def distill(cfg: DictConfig, run_dir: Path, resume: bool = False) -> dict:
    errors = check_cache(cfg)
    if errors:
        raise UserError(*errors)
    device = resolve_device(cfg.device)
    seed_everything(int(cfg.seed), bool(cfg.trainer.deterministic))
    data = build_data(cfg).to(device)
    teachers, records = load_teachers(cfg, data, device, trained=prerequisite(run_dir, "teacher.run") is not None)
    if is_main():
        write_json(run_dir / "teacher.json", records)
    # seed again: the student must start the same whether its teacher was just trained here or reused
    seed_everything(int(cfg.seed), bool(cfg.trainer.deterministic))
    student = build_model(cfg.model, data).to(device)
    phases = {}
    if cfg.kd.get("m2m") is not None:  # module-to-module KD: stages first, then the whole student below
        phases = run_phase1(cfg, run_dir, student, teachers[0], data, device, resume)
        seed_everything(int(cfg.seed), bool(cfg.trainer.deterministic))
    objective = DistillObjective(student, teachers, cfg.kd, data, device, run_dir)
    result = fit(cfg, run_dir, objective, data, device, resume)
    objective.verify_teachers_frozen()
    save_weights(run_dir, student)
    prep = Preprocess(data, device)
    with torch.no_grad():
        teacher_test = [evaluate(t, data.test, prep, int(cfg.data.eval_batch_size), device)["top1"] for t in teachers]
    log.info("teacher test/top1: " + ", ".join(f"{a:.2f}" for a in teacher_test) + "; teachers verified frozen")
    return {
        **result,
        **cost_report(student, data, device),
        "teachers": records,
        "teacher_test_top1": teacher_test,
        "teachers_frozen_verified": True,
        **({"m2m_phase1": phases} if phases else {}),
    }


def needs(cfg: DictConfig) -> list[Need]:
    """With neither teacher.run nor teacher.checkpoint, the teacher (model@teacher) is trained first, on this data."""
    t = cfg.teacher
    if t.run or t.checkpoint:
        return []
    data = OmegaConf.to_container(cfg.data, resolve=True)
    return [Need("teacher", "teacher.run", "train", own_training(t), {"model": teacher_model_node(cfg), "data": data})]


RECIPE = Recipe(run=distill, check=check, needs=needs)
