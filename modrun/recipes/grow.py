"""`modrun grow`: grow a trained model deeper (grow=stack) or wider (grow=net2wider), then train it as usual.

The growth step writes checkpoints/grown.safetensors and then grow.json (the record: source, both model
configs, accuracies before training), then records the grown model as `model` in config.yaml, so that the run
folder rebuilds it (eval, resume, teacher.run, source.run). A resumed run finds grow.json and starts from the
saved grown weights (or from checkpoints/last.pt once one exists); without it, it grows again, identically.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save
from torch import nn

from modrun.components.build import build_data, build_model, cost_report, model_from_run, resolve_device
from modrun.components.data.base import Data, Preprocess, batches
from modrun.components.data.tasks import split_task
from modrun.core.artifacts import load_into, load_state, prerequisite, save_weights
from modrun.core.checkpoint import seed_everything
from modrun.core.collectives import barrier, is_main
from modrun.core.cost import count_params
from modrun.core.runfolder import atomic_write, read_json, write_json
from modrun.engine.evaluation import evaluate
from modrun.engine.loop import Objective, fit
from modrun.methods.distill.teachers import own_training
from modrun.methods.grow import GROWERS, grown_node
from modrun.methods.grow.checks import check
from modrun.recipes.base import Need, Recipe

log = logging.getLogger("modrun")
GROW_FILE = "grow.json"
GROWN_WEIGHTS = Path("checkpoints") / "grown.safetensors"


def load_source(cfg: DictConfig, run_dir: Path, data: Data, device: torch.device) -> tuple[nn.Module, dict, dict]:
    """The model to grow, where it came from, and its model config: a run folder (given, or trained first by the
    runner, exactly as for `modrun prune`) or a weights file for source.model."""
    s = cfg.source
    if s.checkpoint:
        node = OmegaConf.to_container(s.model, resolve=True)
        model = build_model(OmegaConf.create(node), data, path="source.model")
        model = load_into(model, load_state(s.checkpoint), str(s.checkpoint)).to(device)
        return model, {"source": "checkpoint", "checkpoint": str(s.checkpoint)}, node
    model, record = model_from_run(s.run, data, device, "source.run")
    if prerequisite(run_dir, "source.run") is not None:
        record = {**record, "source": "trained", "run": str(s.run)}
    return model, record, record["model"]


def needs(cfg: DictConfig) -> list[Need]:
    """With neither source.run nor source.checkpoint, source.model is trained first (source.seed, source.epochs)."""
    s = cfg.source
    if s.run or s.checkpoint:
        return []
    nodes = {
        "model": OmegaConf.to_container(s.model, resolve=True),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
    }
    return [Need("source", "source.run", "train", own_training(s, "source"), nodes)]


def measure(model: nn.Module, data: Data, device: torch.device, batch_size: int) -> dict[str, Any]:
    """The task's validation and test metrics (eval mode, no augmentation: loss, top1; ppl and bpb for text)
    and the parameter count."""
    prep = Preprocess(data, device)
    out: dict[str, Any] = {}
    for split in ("val", "test"):
        r = evaluate(model, getattr(data, split), prep, batch_size, device)
        out.update({f"{split}/{k}": v for k, v in r.items() if k != "top5"})
    return {**out, "params": count_params(model)["params"]}


@torch.no_grad()
def logit_gap(a: nn.Module, b: nn.Module, data: Data, device: torch.device, batch_size: int) -> float:
    """Largest |logit difference| of two models (eval mode) on the first validation (else test) batch."""
    x, _, _ = next(iter(batches(data.val if len(data.val) else data.test, batch_size, device=device)))
    x = Preprocess(data, device)(x)
    modes = a.training, b.training
    gap = (a.eval()(x) - b.eval()(x)).abs().max().item()
    a.train(modes[0]), b.train(modes[1])
    return gap


def grow_model(cfg: DictConfig, run_dir: Path, data: Data, device: torch.device) -> tuple[nn.Module, dict]:
    """Load (or train) the source, grow it, and save the grown weights and the record (grow.json, written last)."""
    source, origin, source_node = load_source(cfg, run_dir, data, device)
    method, bs = str(cfg.grow.name), int(cfg.data.eval_batch_size)
    node = grown_node(method, source_node, cfg.grow)
    # the grown model's own initial weights (stacking's fresh identity blocks) must be the same on every try
    seed_everything(int(cfg.seed), bool(cfg.trainer.deterministic))
    model = build_model(OmegaConf.create(node), data, path="grown model").to(device)
    module, attr = GROWERS[method].split(":")
    details = getattr(importlib.import_module(module), attr)(source, model, cfg.grow, int(cfg.seed))
    record = {
        "grow": OmegaConf.to_container(cfg.grow, resolve=True),
        "source": origin,
        "source_model": source_node,
        "grown_model": node,
        "source_metrics": measure(source, data, device, bs),
        "grown_before_training": measure(model, data, device, bs),
        "max_abs_logit_diff": logit_gap(source, model, data, device, bs),
        **details,
    }

    if is_main():  # data-parallel: every process grew the same model; rank 0 writes
        (run_dir / GROWN_WEIGHTS).parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        atomic_write(run_dir / GROWN_WEIGHTS, save(tensors))
        write_json(run_dir / GROW_FILE, record)  # last: its presence means the growth step is complete
    return model, record


def record_grown_config(run_dir: Path, record: dict) -> None:
    """config.yaml describes the grown model under `model` (what eval and teacher.run build), the source under
    source.model (what a re-run of this config grows again)."""
    saved = OmegaConf.load(run_dir / "config.yaml")
    if not is_main() or OmegaConf.to_container(saved.model) == record["grown_model"]:
        return
    saved.model = record["grown_model"]
    saved.source.model = record["source_model"]
    atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(saved, resolve=True))


def grow(cfg: DictConfig, run_dir: Path, resume: bool = False) -> dict:
    device = resolve_device(cfg.device)
    seed_everything(int(cfg.seed), bool(cfg.trainer.deterministic))
    data = build_data(cfg).to(device)
    grown = resume and (run_dir / GROW_FILE).exists() and (run_dir / GROWN_WEIGHTS).exists()
    barrier()  # data-parallel: every process decides before rank 0 may write the growth step's files
    if grown:
        record = read_json(run_dir / GROW_FILE)
        model = build_model(OmegaConf.create(record["grown_model"]), data, path="grown model")
        model = load_into(model, load_state(run_dir / GROWN_WEIGHTS), str(run_dir / GROWN_WEIGHTS)).to(device)
        log.info(f"grown model from {GROWN_WEIGHTS} (the growth step of the first session)")
    else:
        model, record = grow_model(cfg, run_dir, data, device)
    record_grown_config(run_dir, record)
    src, before = record["source_metrics"], record["grown_before_training"]
    log.info(
        f"grow={record['grow']['name']} x{record['grow']['factor']}: {_describe(record['source_model'])} "
        f"({src['params']:,} params) -> {_describe(record['grown_model'])} ({before['params']:,} params)"
    )
    metric = split_task(data.val).best  # top1 for images, loss for text
    log.info(
        f"before training: grown val {metric} {before[f'val/{metric}']:.3f} test {before[f'test/{metric}']:.3f}  "
        f"(source {src[f'val/{metric}']:.3f} / {src[f'test/{metric}']:.3f}; "
        f"max |logit diff| {record['max_abs_logit_diff']:.2e})"
    )
    cfg = cfg.copy()
    OmegaConf.update(cfg, "model", record["grown_model"], merge=False)  # loggers see the model that trains
    seed_everything(int(cfg.seed), bool(cfg.trainer.deterministic))  # the same start, grown now or on a resume
    result = fit(cfg, run_dir, Objective(model), data, device, resume)
    save_weights(run_dir, model)
    return {
        **result,
        **cost_report(model, data, device),
        "grown_before_training": before,
        "source": src,
        "grow": {
            **record["grow"],
            "source_model": record["source_model"],
            "grown_model": record["grown_model"],
            "max_abs_logit_diff": record["max_abs_logit_diff"],
        },
    }


def _describe(node: dict) -> str:
    extra = {k: node[k] for k in ("depth", "width", "n_layer", "n_embd", "dim") if k in node}
    return f"{node['name']}({', '.join(f'{k}={v}' for k, v in extra.items())})"


RECIPE = Recipe(run=grow, check=check, needs=needs)
