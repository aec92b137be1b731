"""Checks only `modrun stitch` needs, before any work: two completed anchors of one family, sizes, data, points."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from modrun.methods.stitch import FAMILIES, STAGES, data_mismatch, family

ANCHOR_KEYS = ("model", "seed", "epochs", "overrides")  # an anchor given as a config, trained first


def anchor_model(anchor: DictConfig) -> dict:
    """The model node of an anchor given as a config: `model: cnn_small` or `model: {name: cnn_small, width: 8}`."""
    model = anchor.get("model")
    return {"name": model} if isinstance(model, str) else OmegaConf.to_container(model, resolve=True)


def _config_problem(i: int, anchor: DictConfig) -> str | None:
    unknown = [k for k in anchor if k not in ANCHOR_KEYS]
    if unknown:
        return f"anchors.{i}.{unknown[0]}: unknown key; an anchor config takes {', '.join(ANCHOR_KEYS)}"
    model = anchor.get("model")
    if not (isinstance(model, str) or (isinstance(model, DictConfig) and isinstance(model.get("name"), str))):
        return f"anchors.{i}.model={_show(model)}: expected a model name or a node with a name ({{name: cnn_small}})"
    return None


def check(cfg: DictConfig) -> list[str]:
    anchors = cfg.anchors
    if not isinstance(anchors, ListConfig) or len(anchors) != 2:
        usage = "anchors=[runs/train/<small>,runs/train/<large>] or anchors=[{model: ...},{model: ...}]"
        return [f"anchors={_show(anchors)}: give exactly two run folders or model configs, {usage}"]
    nodes, errors, other_data = [], [], {}
    for i, anchor in enumerate(anchors):
        if isinstance(anchor, DictConfig):  # trained first on this run's data (runner.prerequisites)
            problem = _config_problem(i, anchor)
            if problem:
                errors.append(problem)
                continue
            node = anchor_model(anchor)
            if family(node) is None:
                errors.append(f"anchors.{i}: cannot stitch model '{node.get('name')}'; supported: {_supported()}")
            nodes.append(node)
            continue
        run = Path(str(anchor))
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
