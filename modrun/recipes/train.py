"""`modrun train`: supervised training of one model (or, with `nested=...`, of many nested sizes at once)."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from modrun.components.build import build_data, build_model, cost_report, resolve_device
from modrun.components.data.base import Preprocess
from modrun.core.artifacts import save_weights
from modrun.core.checkpoint import seed_everything
from modrun.core.collectives import is_main
from modrun.core.plots import score_key
from modrun.core.runfolder import write_json
from modrun.engine.evaluation import evaluate
from modrun.engine.loop import Objective, fit
from modrun.methods.nested import base as nested
from modrun.methods.nested import subnet
from modrun.methods.nested.checks import check, check_train
from modrun.methods.nested.exits import ExitsObjective
from modrun.recipes.base import Recipe

log = logging.getLogger("modrun")


def train(cfg: DictConfig, run_dir: Path, resume: bool = False) -> dict:
    device = resolve_device(cfg.device)
    seed_everything(int(cfg.seed), bool(cfg.trainer.deterministic))
    data = build_data(cfg).to(device)
    model = build_model(cfg.model, data).to(device)
    node = cfg.get("nested")
    if node is None or node.name == "none":
        result = fit(cfg, run_dir, Objective(model), data, device, resume)
        save_weights(run_dir, model)
        return {**result, **cost_report(model, data, device)}

    check(cfg, model)
    kd_node = cfg.get("kd")
    if kd_node is None and float(node.get("kd_weight") or 0) > 0:  # a run started before the kd group did this
        term = {"name": "kd", "weight": node.kd_weight, "temperature": node.get("temperature", 4.0)}
        kd_node = OmegaConf.create({"terms": {"kd": term}})
    kd = nested.inplace_terms(kd_node, data.num_classes, len(data.train))
    nested_objective = ExitsObjective if node.name == "exits" else nested.NestedObjective
    objective = nested_objective(model, node, int(cfg.seed), kd)
    result = fit(cfg, run_dir, objective, data, device, resume)
    if node.name == "sorted":  # BatchNorm statistics measured as every cut-out size's are (same 20 batches)
        prep = Preprocess(data, device)
        subnet.recalibrate(model, subnet.calibration_batches(data, prep, int(cfg.data.batch_size)))
        for split in ("val", "test"):  # the final metrics are those of the weights saved
            scores = evaluate(model, getattr(data, split), prep, int(cfg.data.eval_batch_size), device)
            result["final"].update({f"{split}/{k}": v for k, v in scores.items()})
    save_weights(run_dir, model)
    rows = subnet.report(cfg, model, data, device)
    if is_main():
        write_json(run_dir / "nested.json", rows)
        subnet.plot(rows, run_dir / "nested.png")
    key = score_key(rows[0])  # test/top1, or test/bpb for text
    for r in rows:
        log.info(f"{subnet.label(r)}: {key} {r[key]:.4g}  params {r['params']:,}  MACs {r['macs']:,}")
    return {**result, **cost_report(model, data, device), "nested": rows}


RECIPE = Recipe(run=train, check=check_train)
