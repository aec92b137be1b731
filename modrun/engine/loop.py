"""The training loop every pipeline shares. Read it top to bottom: it is the whole story of a run.

A pipeline hands it an `Objective` (the model to train plus how to compute its loss) and the data; the
loop owns optimisation, evaluation, metrics, checkpoints and the exact-resume bookkeeping.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from modrun.components.data.base import Data, Preprocess, batches
from modrun.components.data.tasks import Task
from modrun.components.loggers import build_logger
from modrun.core import checkpoint
from modrun.core import collectives as ddp
from modrun.core.registry import OPTIMIZERS, SCHEDULERS
from modrun.core.runfolder import MetricsWriter
from modrun.core.stopping import Interrupted, NonFiniteLoss, StopRequest, check_finite
from modrun.engine.evaluation import evaluate
from modrun.engine.progress import Progress
from modrun.engine.speed import Speed
from modrun.engine.strategy import Strategy, epoch_length, group_sizes

log = logging.getLogger("modrun")


class Objective:
    """What the loop optimises. `model` is evaluated and saved; `modules` are checkpointed and trained."""

    varying_graph = False  # True: which trained parameters a step uses changes from step to step (DDP is told)

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def loss(
        self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss, the logits used for train accuracy, and named loss terms to log.

        `idx` are the samples' indices in the train split (for per-sample state such as caches)."""
        logits = self.model(x)
        loss = F.cross_entropy(*Task.flat(logits, y))  # images: (B, classes); text: every token of (B, T, vocab)
        return loss, logits, {}

    def start_epoch(self, epoch: int) -> None:
        """Called before each training epoch (0-based; a resumed run gets the epoch it resumes in)."""

    def after_step(self, step: int) -> None:
        """Called after each optimiser step (pruning masks hook in here)."""

    def extra_state(self) -> dict[str, Any]:
        """State beyond the modules' that a checkpoint must carry (caches, schedules)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass


@dataclass
class State:
    step: int = 0
    epoch: int = 0
    best: float = -math.inf
    best_epoch: int = -1
    sums: dict[str, float] = field(default_factory=dict)  # running train sums of the current epoch
    val: dict[str, float] = field(default_factory=dict)  # the last epoch's validation metrics (the final ones)


def fit(
    cfg: DictConfig,
    run_dir: Path,
    objective: Objective,
    data: Data,
    device: torch.device,
    resume: bool,
    phase: str | None = None,
) -> dict:
    """Train `objective` for cfg.trainer.epochs; return final and best metrics.

    A `phase` (one step of a multi-phase pipeline) keeps its checkpoints in checkpoints/<phase>/ and tags
    its metrics records, so each phase resumes on its own."""
    t, seed, task = cfg.trainer, int(cfg.seed), data.task
    bs, world, main = int(cfg.data.batch_size), ddp.world_size(), ddp.is_main()
    # data-parallel: each of `world` processes takes an equal share of every epoch, in batches of bs;
    # an optimiser step takes `accumulate` batches (the epoch's last step what is left)
    strategy = Strategy(t, objective)
    batches_per_epoch, steps_per_epoch = epoch_length(t, len(data.train), bs)
    ends_step = group_sizes(batches_per_epoch, strategy.accumulate)
    total_steps = int(t.epochs) * steps_per_epoch
    speed = Speed(t, device)  # precision, compile, channels_last (modrun/speed.py)
    speed.prepare(objective.model, objective.modules().values())
    ckpt_dir = run_dir / "checkpoints" / phase if phase else run_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint.load_last(ckpt_dir, device, run_dir) if resume else None  # else last.prev.pt, said in the log
    for name, module in objective.modules().items() if ckpt is not None else ():
        module.load_state_dict(ckpt["modules"][name])
    strategy.start()  # data-parallel: DDP gives every process rank 0's weights (loaded or built), FSDP shards them
    params = [p for m in objective.modules().values() for p in m.parameters() if p.requires_grad]
    optim_args = {k: v for k, v in cfg.optim.items() if k != "name"}
    optimizer = OPTIMIZERS.get(cfg.optim.name)(params, **optim_args)
    sched_args = {k: v for k, v in cfg.sched.items() if k != "name"}
    scheduler = SCHEDULERS.get(cfg.sched.name)(optimizer, total_steps, steps_per_epoch, **sched_args)
    aug = cfg.data.get("augment") or {}
    loader = {"num_workers": int(cfg.data.num_workers), "prefetch_factor": int(cfg.data.get("prefetch_factor", 2))}
    prep = Preprocess(data, device, int(aug.get("crop_padding", 0)), bool(aug.get("hflip", False)))

    state = State()
    if ckpt is not None:
        strategy.load_optimizer_state(optimizer, ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        speed.load_state_dict(ckpt.get("scaler", {}))
        objective.load_extra_state(ckpt.get("extra", {}))
        own = ddp.own_state(ckpt)  # this process's random state and partial sums
        state = State(**{**ckpt["state"], "sums": own["sums"]})
        checkpoint.set_rng_state(own["rng"])
        log.info(f"resumed from step {state.step} (epoch {state.epoch})")
    resume_step = state.step if resume else None
    metrics = (  # the logger gets every record; closed with the `with` below
        MetricsWriter(
            run_dir / "metrics.jsonl", resume_step, phase, sinks=[build_logger(cfg, run_dir, phase, resume_step)]
        )
        if main
        else ddp.DiscardMetrics()  # rank 0 alone writes the run folder
    )

    def save(name: str, *also: str) -> None:
        strategy.sync_buffers()
        # never overwrite a good checkpoint with weights that a finite loss already pushed to inf/NaN
        if not strategy.finite():
            raise NonFiniteLoss(f"weights became non-finite by step {state.step}; the last checkpoint is kept")
        modules, optim = strategy.state_dicts(), strategy.optimizer_state(optimizer)  # FSDP: gathered, collectives
        mine = {"rng": checkpoint.rng_state(), "sums": {k: float(v) for k, v in running.items()}}
        ranks = ddp.gather_objects(mine)  # a data-parallel run resumes each process's own state
        if not main:
            return ddp.barrier()
        checkpoint.save(
            ckpt_dir / name,
            {
                "modules": modules,
                "optimizer": optim,
                "scheduler": scheduler.state_dict(),
                "scaler": speed.state_dict(),
                "extra": objective.extra_state(),
                "state": {**vars(state), "sums": mine["sums"]},
                "rng": mine["rng"],
                **({"ranks": ranks} if world > 1 else {}),
                "data_order": {"seed": seed, "epoch": state.epoch, "batch": batch_in_epoch()},
            },
            also=tuple(ckpt_dir / n for n in also),
        )
        ddp.barrier()  # the other processes read checkpoints (best.pt at the end) only once they are written

    # running sums of this epoch's train metrics stay on the device: no host sync per step
    running = {k: torch.tensor(v, dtype=torch.float64, device=device) for k, v in state.sums.items()}

    def batch_in_epoch() -> int:  # checkpoints are taken at optimiser steps: whole steps of batches are done
        return (state.step - state.epoch * steps_per_epoch) * strategy.accumulate

    def forward_backward(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, b: int) -> tuple:
        last, size = ends_step(b)
        if b % strategy.accumulate == 0:  # the step's first batch (a compiled first step redone eagerly: again)
            optimizer.zero_grad(set_to_none=True)
        with strategy.sync(last):  # DDP all-reduces the gradients on the step's last batch only
            with speed.autocast():  # trainer.precision: forward and loss in bf16/fp16, weights stay fp32
                loss, logits, terms = strategy.loss(x, y, idx)
            # 16-mixed: scaled up so that small fp16 gradients do not vanish; / size: the step's mean gradient
            speed.scaler.scale(loss / size if size > 1 else loss).backward()
        return loss, logits, terms

    val: dict[str, float] = dict(state.val)  # a run killed after its last epoch's checkpoint ends with them too
    stop = StopRequest()
    t0 = time.time()
    with stop, Progress(total_steps, initial=state.step, enabled=t.progress and main) as bar, metrics:
        while state.epoch < int(t.epochs):
            objective.model.train()
            objective.start_epoch(state.epoch)
            start = batch_in_epoch()
            for b, (x, y, idx) in enumerate(
                batches(
                    data.train,
                    bs,
                    seed=seed,
                    epoch=state.epoch,
                    shuffle=True,
                    drop_last=t.drop_last,
                    start=start,
                    device=device,
                    shard="train" if world > 1 else None,
                    **loader,
                ),
                start,
            ):
                # augmentation is seeded by the batch, so a resumed run draws the same crops and flips
                x = speed.inputs(prep(x, augment_seed=seed * 7919 + state.epoch * batches_per_epoch + b))
                # a compiled model compiles on its first step; if that fails, the step is redone eagerly
                loss, logits, terms = speed.step(forward_backward, x, y, idx, b)
                _accumulate(running, task, loss, logits, y, terms)
                if not ends_step(b)[0]:
                    continue
                strategy.after_backward()  # DDP: unused parameters named; FSDP: replicated modules' gradients
                if t.grad_clip:
                    speed.scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
                    strategy.clip_gradients(params, float(t.grad_clip))
                speed.scaler.step(optimizer)  # 16-mixed: skipped when the gradients overflowed
                speed.scaler.update()
                scheduler.step()
                state.step += 1
                objective.after_step(state.step)
                bar.update(state.step, f"epoch {state.epoch + 1}/{t.epochs}")
                # a NaN/inf loss poisons the running sum; checking it only here and before each save avoids a
                # host sync per step, and no checkpoint is ever written after the loss went bad
                stopping = ddp.any_rank(stop.requested is not None, device)  # every process stops at one step
                must_save = (t.checkpoint_every_steps and state.step % int(t.checkpoint_every_steps) == 0) or stopping
                if state.step % int(t.log_every_steps) == 0 or must_save:
                    check_finite(ddp.reduce_sums(running), state.step, state.epoch)
                if state.step % int(t.log_every_steps) == 0:
                    metrics.write(
                        {
                            "step": state.step,
                            "epoch": state.epoch,
                            "split": "train",
                            "loss": loss.item(),
                            **{k: v.item() for k, v in terms.items()},
                            "lr": scheduler.get_last_lr()[0],
                            "time": time.time() - t0,
                        }
                    )
                if must_save:
                    save("last.pt")
                if stopping:
                    raise Interrupted(
                        f"stopped by {stop.requested or 'another process'} at step {state.step}; resumable"
                    )

            totals = ddp.reduce_sums(running)  # over every process's share of the epoch
            check_finite(totals, state.step, state.epoch)
            train = {k: (v / totals["n"]).item() for k, v in totals.items() if k != "n"}
            running, state.epoch = {}, state.epoch + 1
            strategy.sync_buffers()
            with speed.eager():
                val = evaluate(
                    objective.model, data.val, prep, int(cfg.data.eval_batch_size), device,
                    every_rank=strategy.evaluates_everywhere, **loader,
                )  # fmt: skip
            state.val = val
            metrics.write({"step": state.step, "epoch": state.epoch, "split": "val", **val, "time": time.time() - t0})
            metrics.write({"step": state.step, "epoch": state.epoch, "split": "train_epoch", **train})
            bpb = f" bpb {val['bpb']:.4f}" if "bpb" in val else ""
            log.info(
                f"epoch {state.epoch}/{t.epochs}  train loss {train['loss']:.4f} top1 {train['top1']:.2f}  "
                f"val loss {val['loss']:.4f} top1 {val['top1']:.2f}{bpb}  lr {scheduler.get_last_lr()[0]:.4g}"
            )
            if task.better(val[task.best], state.best if state.best_epoch >= 0 else None):  # the task's metric
                state.best, state.best_epoch = val[task.best], state.epoch
                save("best.pt", "last.pt")  # best first: a kill between them redoes the epoch; one serialisation
            else:
                save("last.pt")

    strategy.finish()  # FSDP: every process gets the whole trained model back
    speed.release()  # the pipeline gets back a plain module (cost report, saving, a next phase)
    eval_bs = int(cfg.data.eval_batch_size)
    if not val and state.epoch > 0:  # a checkpoint from before `val` was kept: the same weights, measured again
        val = evaluate(objective.model, data.val, prep, eval_bs, device, **loader)

    def test(model: nn.Module) -> dict[str, float]:
        return {f"test/{k}": v for k, v in evaluate(model, data.test, prep, eval_bs, device, **loader).items()}

    final = {**{f"val/{k}": v for k, v in val.items()}, **test(objective.model)}
    # no epoch trained (trainer.epochs=0): no best (and no infinity in summary.json, which JSON cannot hold)
    best = {"epoch": state.best_epoch, f"val/{task.best}": state.best if state.best_epoch >= 0 else None}
    if state.best_epoch == state.epoch:  # the best is the model in hand (never at epoch 0: best_epoch is -1)
        best.update({k: v for k, v in final.items() if k.startswith("test/")})
    elif (ckpt_dir / "best.pt").exists():
        best_model = _copy_with_weights(
            objective.model, checkpoint.load(ckpt_dir / "best.pt", device, run_dir)["modules"]["model"]
        )
        best.update(test(best_model))
    return {"final": final, "best": best, "steps": state.step, "epochs": state.epoch}


def _accumulate(
    sums: dict[str, torch.Tensor],
    task: Task,
    loss: torch.Tensor,
    logits: torch.Tensor,
    y: torch.Tensor,
    terms: dict[str, torch.Tensor],
) -> None:
    new = task.sums(logits, y, loss)  # items: images, or tokens of a window
    new["top1"] = 100.0 * new["top1"]
    new.update({k: v.detach() * new["n"] for k, v in terms.items()})
    for k, v in new.items():
        sums[k] = sums[k] + v if k in sums else torch.as_tensor(v, dtype=torch.float64, device=y.device)


def _copy_with_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:

    clone = copy.deepcopy(model)
    clone.load_state_dict(weights)
    return clone
