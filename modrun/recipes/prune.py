"""`modrun prune`: prune a trained model, recover by fine-tuning or distillation, report accuracy, size, speed."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from modrun.components.build import build_data, build_model, model_from_run, resolve_device
from modrun.components.data.base import Preprocess, batches
from modrun.components.data.tasks import split_task
from modrun.components.shapes import SHAPES_FILE, changed_shapes, layer_shapes
from modrun.core.artifacts import load_into, load_state, prerequisite, save_weights
from modrun.core.checkpoint import seed_everything
from modrun.core.collectives import is_main
from modrun.core.errors import UserError
from modrun.core.registry import PRUNERS
from modrun.core.runfolder import atomic_write, write_json
from modrun.engine.evaluation import evaluate
from modrun.engine.loop import Objective, fit
from modrun.engine.strategy import epoch_length
from modrun.methods.distill.objective import DistillObjective
from modrun.methods.distill.teachers import own_training
from modrun.methods.prune import RUNNER_KEYS
from modrun.methods.prune.checks import check
from modrun.methods.prune.context import PruneContext, select_layers
from modrun.methods.prune.heads import HF_FOLDER
from modrun.methods.prune.imp import IMPPruner, run_rounds
from modrun.methods.prune.report import NOTE_UNSTRUCTURED, latencies, measure, print_report
from modrun.recipes.base import Need, Recipe

log = logging.getLogger("modrun")


class PruneObjective(Objective):
    """Any objective (fine-tuning, distillation) with the pruner's masks re-applied after every step."""

    def __init__(self, inner: Objective, pruner: Any) -> None:
        super().__init__(inner.model)
        self.inner, self.pruner = inner, pruner

    def modules(self) -> dict[str, torch.nn.Module]:
        return self.inner.modules()

    def loss(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> tuple:
        return self.inner.loss(x, y, idx)

    def start_epoch(self, epoch: int) -> None:
        self.inner.start_epoch(epoch)

    def after_step(self, step: int) -> None:
        self.inner.after_step(step)
        self.pruner.after_step(step)

    def extra_state(self) -> dict[str, Any]:
        return {**self.inner.extra_state(), "pruner": self.pruner.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.inner.load_extra_state(state)
        if "pruner" in state:
            self.pruner.load_state_dict(state["pruner"])


def load_source(cfg: DictConfig, run_dir: Path, data: Any, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The model to prune: from a run folder (given, or trained first by the runner) or a weights file for `model`."""
    s = cfg.source
    if s.checkpoint:
        model = load_into(build_model(cfg.model, data), load_state(s.checkpoint), str(s.checkpoint))
        return model.to(device), {"source": "checkpoint", "checkpoint": str(s.checkpoint)}
    model, record = model_from_run(s.run, data, device, "source.run")
    if prerequisite(run_dir, "source.run") is not None:
        record = {**record, "source": "trained", "run": str(s.run)}
    return model, record


def needs(cfg: DictConfig) -> list[Need]:
    """With neither source.run nor source.checkpoint, `model` is trained first (source.seed, source.epochs)."""
    s = cfg.source
    if s.run or s.checkpoint:
        return []
    nodes = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "data")}
    return [Need("source", "source.run", "train", own_training(s, "source"), nodes)]


def prune(cfg: DictConfig, run_dir: Path, resume: bool = False) -> dict:
    device = resolve_device(cfg.device)
    seed_everything(int(cfg.seed), bool(cfg.trainer.deterministic))
    data = build_data(cfg).to(device)
    model, record = load_source(cfg, run_dir, data, device)
    if is_main():  # data-parallel: every process prunes the same model alike; rank 0 writes
        write_json(run_dir / "source.json", record)
    dense = copy.deepcopy(model).eval().requires_grad_(False)
    prep, eval_bs = Preprocess(data, device), int(cfg.data.eval_batch_size)
    dense_cost = {**measure(dense, data), **_test_scores(evaluate(dense, data.test, prep, eval_bs, device))}

    seed_everything(int(cfg.seed), bool(cfg.trainer.deterministic))  # the same start, source trained here or not
    p = cfg.prune
    targets = select_layers(model, list(p.include), list(p.exclude), list(p.types))
    example = data.example(1, device)  # an image, or a window of tokens
    args = {k: v for k, v in OmegaConf.to_container(p, resolve=True).items() if k not in RUNNER_KEYS}
    calib = _calibration(cfg, data, prep), *_calibration_loss(cfg, data, prep, model)
    ctx = PruneContext(model, targets, int(cfg.seed), example, data.num_classes, run_dir, *calib)
    pruner = PRUNERS.get(p.name)(ctx, **args)
    if getattr(pruner, "analysis", False):  # sensitivity: measures, prunes nothing
        task = split_task(data.val)

        def score() -> float:
            return evaluate(model, data.val, prep, eval_bs, device)[task.best]

        return {**pruner.analyse(score, task.best, task.maximize, run_dir), "dense": dense_cost}
    # the optimiser steps the loop will take (per process, K batches each): gradual schedules count those
    steps = int(cfg.trainer.epochs) * epoch_length(cfg.trainer, len(data.train), int(cfg.data.batch_size))[1]
    pruner.start(steps)  # one-shot pruning happens here; it is deterministic, so a resume redoes it
    if pruner.structured:
        shapes = changed_shapes(layer_shapes(dense), layer_shapes(model))
        if is_main():
            atomic_write(run_dir / SHAPES_FILE, json.dumps(shapes, indent=2) + "\n")
        log.info(
            f"prune={p.name} changed {len(shapes)} modules; parameters {dense_cost['params']:,} -> "
            f"{sum(q.numel() for q in model.parameters()):,}"
        )

    recover = cfg.recover.name
    if recover == "none":
        if getattr(pruner, "schedule", None) or isinstance(pruner, IMPPruner):
            raise UserError(f"prune={p.name} prunes during training; use recover=finetune or recover=distill")
        result = {
            "final": {
                f"{split}/{k}": v
                for split in ("val", "test")
                for k, v in evaluate(model, getattr(data, split), prep, eval_bs, device).items()
            }
        }
    else:

        def train(phase: str | None = None) -> dict:
            inner = (
                Objective(model)
                if recover == "finetune"
                else DistillObjective(model, [dense], cfg.kd, data, device, run_dir)
            )
            return fit(cfg, run_dir, PruneObjective(inner, pruner), data, device, resume, phase=phase)

        result = run_rounds(pruner, train, int(cfg.seed), device) if isinstance(pruner, IMPPruner) else train()
    pruner.apply() if hasattr(pruner, "apply") else None  # masks made permanent in the saved weights
    save_weights(run_dir, model)
    if is_main() and getattr(pruner, "hf_config", None) is not None:  # a Hugging Face folder of the pruned model
        model.model.save_pretrained(run_dir / HF_FOLDER, safe_serialization=True)
    final = {k.removeprefix("test/"): v for k, v in result["final"].items() if k.startswith("test/")}
    pruned_cost = {**measure(model, data), **_test_scores(final)}
    if not is_main():  # rank 0 reports for the run; timing on every process at once would slow them all
        return result
    timed = latencies({"dense": dense, "pruned": model}, data, device)
    dense_cost.update(timed["dense"])
    pruned_cost.update(timed["pruned"])
    print_report(dense_cost, pruned_cost, pruner.structured)
    return {
        **result,
        **{k: v for k, v in pruned_cost.items() if not k.startswith("test_")},
        "dense": dense_cost,
        "pruned": pruned_cost,
        "speedup_cpu_b64": dense_cost["latency_ms_cpu_b64"] / pruned_cost["latency_ms_cpu_b64"],
        "layer_sparsity": pruner.layer_sparsity(),
        "structured": pruner.structured,
        **(pruner.record() if hasattr(pruner, "record") else {}),  # depth: units removed; width: sizes left
        **({} if pruner.structured else {"note": NOTE_UNSTRUCTURED}),
    }


def _first_batches(cfg: DictConfig, data: Any, prep: Preprocess, n: int) -> Iterator[tuple[torch.Tensor, Any]]:
    """The first n shuffled training batches (epoch 0 of the run's own order), model-ready, every time alike."""
    order = batches(data.train, int(cfg.data.batch_size), seed=int(cfg.seed), shuffle=True, device=prep.device)
    for _, (x, y, _) in zip(range(n), order, strict=False):
        yield prep(x), y


def _calibration(cfg: DictConfig, data: Any, prep: Preprocess) -> Any:
    """n -> a fresh iterator over the inputs of the first n training batches (Wanda's, depth pruning's)."""
    return lambda n: lambda: (x for x, _ in _first_batches(cfg, data, prep, n))


def _calibration_loss(cfg: DictConfig, data: Any, prep: Preprocess, model: torch.nn.Module) -> tuple[Any, Any]:
    """n -> the model's mean task loss (per item) over the first n training batches, as the model is now; and
    n -> that loss's gradient accumulated into the model's .grad (set afresh)."""

    def loss(n: int) -> float:
        task, total, count = split_task(data.train), 0.0, 0
        with torch.no_grad():
            for x, y in _first_batches(cfg, data, prep, n):
                total += float(task.loss(model(x), y)) * y.numel()
                count += y.numel()
        return total / max(count, 1)

    def backward(n: int) -> None:
        task, count, was_training = split_task(data.train), 0, model.training
        model.eval().zero_grad(set_to_none=True)  # eval: no dropout, the gradient of the model as it will be used
        with torch.enable_grad():
            for x, y in _first_batches(cfg, data, prep, n):
                (task.loss(model(x), y) * y.numel()).backward()
                count += y.numel()
        for p in model.parameters():
            if p.grad is not None:
                p.grad.div_(max(count, 1))
        model.train(was_training)

    return loss, backward


def _test_scores(scores: dict[str, float]) -> dict[str, float]:
    """The test metrics the cost report shows beside the costs: top-1 for images, loss and bpb for text."""
    return {f"test_{k}": v for k, v in scores.items() if k in ("top1", "loss", "bpb")}


# the pruned model's cost (report.measure, report.latencies), and sensitivity's findings
SUMMARY_KEYS = (
    *("sparse_macs", "file_bytes", "latency_ms_cpu_b1", "latency_ms_cpu_b64", "latency_ms_cuda_b64", "speedup_cpu_b64"),
    "suggested_overall_sparsity",
)
RECIPE = Recipe(run=prune, check=check, needs=needs, summary_keys=SUMMARY_KEYS)
