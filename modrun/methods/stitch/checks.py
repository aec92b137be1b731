"""Checks only `modrun stitch` needs, before any work: two completed anchors of one family, sizes, data, points."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from modrun.methods.stitch import FAMILIES, data_mismatch, family, stage_count

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
    return pair_problems(a, b, None if points is None else list(points))


def pair_problems(a: dict, b: dict, points: list[int] | None) -> list[str]:
    """What two anchors of one family must also agree on, and whether `points` are theirs. A key that an anchor
    config leaves unset is skipped here; the run checks again on the trained anchors' full configs."""
    problem = _vit_problem(a, b) if family(a) == "vit" else None
    if problem:
        return [problem]
    stages = stage_count(a) or stage_count(b)  # vits: equal depth by now, so either one's
    if points is None or stages is None or max(points) <= stages - 2:  # the last stage (the head) has no after
        return []
    where = f"after each of its {stages - 1} blocks" if family(a) == "vit" else "after each stage but the head"
    return [f"stitch.points={points}: {a['name']} has stitch points 0..{stages - 2} ({where})"]


def _vit_problem(a: dict, b: dict) -> str | None:
    """Equal depth (as SN-Net's DeiTs: after block k of the small vit comes block k + 1 of the large one, with no
    mapping between depths) and equal patch size (so that both token streams have the same tokens)."""
    da, db = a.get("depth"), b.get("depth")
    if da is not None and db is not None and da != db:
        return f"anchors: vit anchors of model.depth {da} vs {db}; stitching pairs block k with block k: give one depth"
    pa, pb = a.get("patch"), b.get("patch")
    if pa is not None and pb is not None and pa != pb:
        size = a.get("image_size")
        tokens = f" ({(size // pa) ** 2 + 1} vs {(size // pb) ** 2 + 1} tokens)" if isinstance(size, int) else ""
        return f"anchors: vit anchors of model.patch {pa} vs {pb}{tokens}; the token counts must agree: give one patch"
    return None


def _data(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg.data, resolve=True)


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _show(value: object) -> str:
    return str(OmegaConf.to_container(value) if isinstance(value, (ListConfig, DictConfig)) else value)


def _supported() -> str:
    return ", ".join(n for names in FAMILIES.values() for n in names)
