"""Checks only `modrun stitch` needs, before any work: two completed anchors of one family, sizes, data, points."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from modrun.methods.stitch import FAMILIES, STAGES, data_mismatch, family


def check(cfg: DictConfig) -> list[str]:
    anchors = cfg.anchors
    if not isinstance(anchors, ListConfig) or len(anchors) != 2:
        usage = "anchors=[runs/train/<small>,runs/train/<large>]"
        return [f"anchors={_show(anchors)}: give exactly two run folders, {usage}"]
    nodes, errors, other_data = [], [], {}
    for run in map(Path, map(str, anchors)):
        if not (run / "config.yaml").is_file():
            errors.append(f"anchors: {run} is not a modrun run folder (no config.yaml)")
            continue
        status = OmegaConf.load(run / "status.json") if (run / "status.json").is_file() else {}
        if status.get("state") != "completed":
            errors.append(f"anchors: the run {run} is {status.get('state', 'unknown')}, not completed; resume it first")
        elif not (run / "model.safetensors").is_file():
            errors.append(f"anchors: the run {run} has no model.safetensors")
        elif (run / "model_shapes.json").is_file():
            errors.append(f"anchors: {run} holds a channel-pruned model (model_shapes.json); stitch unpruned runs")
        saved = OmegaConf.load(run / "config.yaml")
        if "model" not in saved:
            errors.append(f"anchors: the run {run} records no single model (a stitch run cannot be an anchor)")
            continue
        node = OmegaConf.to_container(saved.model, resolve=True)
        if family(node) is None:
            errors.append(f"anchors: cannot stitch model '{node.get('name')}' of {run}; supported: {_supported()}")
        mismatch = data_mismatch(OmegaConf.to_container(saved.data, resolve=True), _data(cfg))
        if mismatch:
            other_data.setdefault(mismatch, []).append(str(run))
        nodes.append(node)
    for mismatch, runs in other_data.items():  # one line per difference, however many anchors share it
        errors.append(f"anchors: {', '.join(runs)} trained on other data ({mismatch}); set the run's data to match")
    if errors or len(nodes) != 2:
        return errors
    a, b = nodes
    if family(a) != family(b):
        return [f"anchors: different model families ({a['name']} vs {b['name']}); stitch two of one family"]
    if a == b:
        return [f"anchors: both are the same architecture ({a['name']}); stitch a smaller and a larger one"]
    points = cfg.stitch.points
    if points is not None and (not isinstance(points, ListConfig) or not points or not all(_int(p) for p in points)):
        return [f"stitch.points={_show(points)}: expected null (every boundary) or a list of stage indices"]
    last = STAGES[family(a)] - 2  # after the last stage (the head) there is nothing left to stitch
    if points is not None and max(points) > last:
        where = "after each stage but the head"
        return [f"stitch.points={_show(points)}: {a['name']} has stitch points 0..{last} ({where})"]
    return []


def _data(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg.data, resolve=True)


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _show(value: object) -> str:
    return str(OmegaConf.to_container(value) if isinstance(value, (ListConfig, DictConfig)) else value)


def _supported() -> str:
    return ", ".join(n for names in FAMILIES.values() for n in names)
