"""`modrun train`: supervised training of one model."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from modrun.checkpoint import seed_everything
from modrun.loop import Objective, fit
from modrun.pipelines.common import build_data, build_model, cost_report, resolve_device, save_weights


def train(cfg: DictConfig, run_dir: Path, resume: bool = False) -> dict:
    device = resolve_device(cfg.device)
    seed_everything(int(cfg.seed), bool(cfg.trainer.deterministic))
    data = build_data(cfg).to(device)
    model = build_model(cfg.model, data).to(device)
    result = fit(cfg, run_dir, Objective(model), data, device, resume)
    save_weights(run_dir, model)
    return {**result, **cost_report(model, data, device)}
