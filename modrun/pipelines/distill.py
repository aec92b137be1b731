"""`modrun distill`: a student learns from one or more frozen teachers through weighted KD terms."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from modrun.checkpoint import seed_everything
from modrun.data.base import Preprocess
from modrun.distill.m2m import run_phase1
from modrun.distill.objective import DistillObjective
from modrun.distill.teachers import load_teachers
from modrun.distributed import is_main
from modrun.errors import UserError
from modrun.loop import evaluate, fit
from modrun.pipelines.common import build_data, build_model, cost_report, resolve_device, save_weights
from modrun.runs import write_json

log = logging.getLogger("modrun")


def check_cache(cfg: DictConfig) -> list[str]:
    """The teacher cache assumes a sample's teacher outputs never change: no random augmentation."""
    aug = cfg.data.get("augment") or {}
    if cfg.kd.cache_teacher and (aug.get("crop_padding") or aug.get("hflip")):
        return [
            "kd.cache_teacher=true needs deterministic inputs, but data.augment is random "
            "(set data.augment.crop_padding=0 data.augment.hflip=false, or kd.cache_teacher=false)"
        ]
    return []


def distill(cfg: DictConfig, run_dir: Path, resume: bool = False) -> dict:
    errors = check_cache(cfg)
    if errors:
        raise UserError(*errors)
    device = resolve_device(cfg.device)
    seed_everything(int(cfg.seed), bool(cfg.trainer.deterministic))
    data = build_data(cfg).to(device)
    teachers, records = load_teachers(cfg, data, device)
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
