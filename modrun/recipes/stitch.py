"""`modrun stitch`: two trained anchors of one family (small, large) become a stitchable network (SN-Net, Pan
et al. 2023): the small anchor's first stages, a stitching layer (a 1x1 conv between CNN stages, a per-token
linear map between ViT blocks), the large anchor's remaining stages, at every stitch point. The anchors stay
frozen; the stitches start from a least-squares fit of the large anchor's features and are then trained with the
ordinary loop, one point per step.

The run folder holds model.safetensors (the stitching layers alone) and stitch.json (the anchors and points),
summary.json `stitches` and stitch.png (every point and both anchors: accuracy, parameters, MACs, latency).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save

from modrun.components.build import build_data, model_from_run, resolve_device
from modrun.components.data.base import Preprocess, batches
from modrun.core.checkpoint import seed_everything
from modrun.core.collectives import is_main
from modrun.core.cost import count_params
from modrun.core.errors import UserError
from modrun.core.runfolder import atomic_write, write_json
from modrun.engine.loop import fit
from modrun.methods.distill.teachers import own_training
from modrun.methods.stitch import STITCH_FILE
from modrun.methods.stitch.checks import anchor_model, check, pair_problems
from modrun.methods.stitch.net import StitchNet, StitchObjective, build, plot, report
from modrun.recipes.base import Need, Recipe

log = logging.getLogger("modrun")


def init_batch(data: object, device: torch.device, samples: int) -> torch.Tensor:
    """The first `samples` training images of a fixed order (seed 0), without augmentation: the same every run."""
    x, _, _ = next(iter(batches(data.train, samples, seed=0, epoch=0, shuffle=True, device=device)))
    return Preprocess(data, device)(x)


def save_stitches(run_dir: Path, net: StitchNet, record: dict) -> None:

    if not is_main():
        return
    tensors = {f"stitches.{k}": v.detach().cpu().contiguous() for k, v in net.stitches.state_dict().items()}
    atomic_write(run_dir / "model.safetensors", save(tensors))
    write_json(run_dir / STITCH_FILE, record)


def stitch(cfg: DictConfig, run_dir: Path, resume: bool = False) -> dict:
    device = resolve_device(cfg.device)
    seed_everything(int(cfg.seed), bool(cfg.trainer.deterministic))
    data = build_data(cfg).to(device)
    anchors = [(*model_from_run(str(run), data, device, "anchors"), str(run)) for run in cfg.anchors]
    # whichever order they were given in: the small anchor's front, the large anchor's back
    (small, small_rec, small_run), (large, large_rec, large_run) = sorted(
        anchors, key=lambda a: count_params(a[0])["params"]
    )
    given = sorted({int(k) for k in cfg.stitch.points}) if cfg.stitch.points is not None else None
    problems = pair_problems(small_rec["model"], large_rec["model"], given)  # anchor configs that left keys unset
    if problems:
        raise UserError(*problems)
    points = given if given is not None else list(range(len(small.stages()) - 1))
    net = build(small, large, points, init_batch(data, device, int(cfg.stitch.init_samples)))
    log.info(
        f"stitch: {small_rec['model']['name']} {count_params(small)['params']:,} params -> "
        f"{large_rec['model']['name']} {count_params(large)['params']:,} params at points {points} "
        f"(stitches {[tuple(net.stitches[str(k)].weight.shape[1::-1]) for k in points]}, least-squares start)"
    )
    seed_everything(int(cfg.seed), bool(cfg.trainer.deterministic))  # the same start now or on a resume
    result = fit(cfg, run_dir, StitchObjective(net, points, int(cfg.seed)), data, device, resume)
    record = {
        "small": {"run": small_run, "model": small_rec["model"]},
        "large": {"run": large_run, "model": large_rec["model"]},
        "points": points,
        "eval_point": net.point,
        "channels": {str(k): list(net.stitches[str(k)].weight.shape[1::-1]) for k in points},
        "layer": net.layer,
        "stitch": OmegaConf.to_container(cfg.stitch, resolve=True),
    }
    save_stitches(run_dir, net, record)
    rows = report(net, points, data, device, int(cfg.data.eval_batch_size))
    if is_main():
        plot(rows, run_dir / "stitch.png")
    for r in rows:
        log.info(f"{r['model']:>10}: test/top1 {r['test/top1']:.2f}  params {r['params']:,}  MACs {r['macs']:,}")
    return {**result, "stitches": rows, "stitch": record}


def needs(cfg: DictConfig) -> list[Need]:
    """Anchors given as configs (`anchors=[{model: ...},{model: ...}]`) are trained first on this run's data,
    each with its own seed (0), epochs and overrides; run folders are used as they are."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    return [
        Need("anchor", f"anchors.{i}", "train", [f"model={anchor_model(a)['name']}", *own_training(a, f"anchors.{i}")],
             {"data": data}, {"model": anchor_model(a)})
        for i, a in enumerate(cfg.anchors)
        if isinstance(a, DictConfig)
    ]  # fmt: skip


RECIPE = Recipe(run=stitch, check=check, needs=needs)
