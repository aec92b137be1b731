"""`modrun eval RUN_DIR [OVERRIDES]`: evaluate a run's weights, on its own data or on other data."""

from __future__ import annotations

# imports inside functions here defer torch: the CLI imports this module for `--help`, which must not load torch
import json
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from modrun.core.errors import UserError
from modrun.core.runfolder import append_line
from modrun.core.values import take_overrides
from modrun.runner.checks import check_config, dotted_keys
from modrun.runner.compose import Composer
from modrun.runner.validate import check_group_choice, check_value_override

NESTED_KEYS = ("nested.width", "nested.depth", "nested.dim", "nested.exit")
BY = {"sorted": ("nested.width", "nested.depth"), "matryoshka": ("nested.dim",), "exits": ("nested.exit",)}


def apply_overrides(cfg: DictConfig, overrides: list[str], command: str, config_dir: Path | None) -> DictConfig:
    """A saved (resolved) config with overrides on top: `group=option` swaps the node, `key=value` sets a key."""
    if not overrides:
        return cfg
    cfg = cfg.copy()
    with Composer(command, config_dir) as composer:
        groups, errors = set(composer.groups()), []
        for o in composer.parse(overrides):
            if o.key_or_group in groups:
                problems = check_group_choice(composer, o)
                if not problems:
                    fresh = composer.compose([o.input_line])
                    # resolve the new node against the saved config (e.g. model args that read data.*)
                    rest = OmegaConf.masked_copy(cfg, [k for k in cfg if k != o.key_or_group])
                    merged = OmegaConf.merge(rest, {o.key_or_group: fresh[o.key_or_group]})
                    cfg[o.key_or_group] = OmegaConf.to_container(merged[o.key_or_group], resolve=True)
                errors += problems
            else:
                problems = check_value_override(cfg, set(dotted_keys(cfg)), o)
                if not problems:
                    OmegaConf.update(cfg, o.key_or_group, o.value(), force_add=o.is_add() or o.is_force_add())
                errors += problems
    errors += check_config(cfg, cfg)
    if errors:
        raise UserError(*errors)
    return cfg


def nested_size(cfg: DictConfig, overrides: list[str]) -> tuple[object, list[str]]:
    """`nested.width=0.5` and/or `nested.depth=0.5` (sorted; the other defaults to 1), `nested.dim=16`
    (matryoshka) or `nested.exit=2` (exits) picks one size of a nested run."""
    node = cfg.get("nested")
    kind = str(node.name) if node else "none"
    picked, rest = take_overrides(overrides, NESTED_KEYS)
    if not picked:
        return None, overrides
    key = next(iter(picked))
    if kind not in BY:
        raise UserError(f"{key}: this run was not trained with nested=sorted, nested=matryoshka or nested=exits")
    from modrun.methods.nested.base import Exit, depths, sizes

    wrong = [k for k in picked if k not in BY[kind]]
    if wrong:
        raise UserError(f"{wrong[0]}: a nested={kind} run offers sizes by {' / '.join(BY[kind])}")
    if kind == "exits":
        from modrun.components.drybuild import build_on_meta
        from modrun.methods.nested.exits import exit_blocks

        offered = sizes(node, len(exit_blocks(build_on_meta(cfg.model), cfg.model.name)))
    else:
        offered = sizes(node)
    choices = {
        "nested.width": sorted({w for w, _ in offered}) if kind == "sorted" else [],
        "nested.depth": depths(node) if kind == "sorted" else [],
        "nested.dim": offered if kind == "matryoshka" else [],
        "nested.exit": [e.blocks for e in offered] if kind == "exits" else [],
    }
    values = {}
    for k, v in picked.items():
        try:
            values[k] = int(v) if k in ("nested.dim", "nested.exit") else float(v)
        except ValueError:
            raise UserError(f"{k}={v}: expected a number, one of {choices[k]}") from None
        if values[k] not in choices[k]:
            raise UserError(f"{k}={v}: the run trained the {k.split('.')[1]}s {choices[k]}")
    if kind == "exits":
        return Exit(values["nested.exit"]), rest
    size = (
        values["nested.dim"]
        if kind == "matryoshka"
        else (values.get("nested.width", 1.0), values.get("nested.depth", 1.0))
    )
    return size, rest


def skipped_blocks(overrides: list[str]) -> tuple[list[int], list[str]]:
    """`skip=[2,3]`: the blocks evaluated as if absent (test-time layer skipping)."""
    picked, rest = take_overrides(overrides, ("skip",))
    if "skip" not in picked:
        return [], overrides
    import yaml

    try:
        value = yaml.safe_load(picked["skip"])
    except yaml.YAMLError:
        value = None
    value = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(value, list) or not value or not all(type(v) is int for v in value):
        raise UserError(f"skip={picked['skip']}: expected block indices, e.g. skip=[2,3]")
    return sorted(set(value)), rest


def skip_blocks(model: object, skip: list[int]) -> list:
    """Hooks that make the model's blocks `skip` hand their input on; a block that does not exist is an error."""
    from modrun.methods.prune.depth import model_blocks, skip_hooks

    blocks = model_blocks(model, "skip")
    bad = [i for i in skip if not 0 <= i < len(blocks)]
    if bad:
        raise UserError(f"skip={skip}: block {bad[0]} does not exist; this model has blocks 0..{len(blocks) - 1}")
    if len(skip) == len(blocks):
        raise UserError(f"skip={skip}: would skip every block; keep at least one")
    return skip_hooks([(blocks[i][1], False) for i in skip])


def evaluate_run(run_dir: Path, overrides: list[str], weights: str = "final", config_dir: Path | None = None) -> dict:
    import torch

    from modrun.components.build import build_data, resolve_device
    from modrun.components.data.base import Preprocess
    from modrun.core.artifacts import load_into, load_run_config
    from modrun.core.registry import split_imports
    from modrun.engine.evaluation import evaluate
    from modrun.runner.validate import check_record

    run_dir = Path(run_dir)
    cfg, status = load_run_config(run_dir)
    given, overrides = split_imports(overrides)
    check_record("train", cfg, run_dir, given, whole=False)  # a record is input: imports, types, names
    command = status.get("command", "train")
    # a soup has no Hydra config of its own: group overrides (data=...) compose as for a training run
    command = command if command in ("train", "distill", "prune", "stitch") else "train"
    size, overrides = nested_size(cfg, overrides)
    skip, overrides = skipped_blocks(overrides)
    point = None
    if command == "stitch":  # stitch.point=k: one stitched model of the run (default: its eval point)
        from modrun.methods.stitch.load import stitch_point

        point, overrides = stitch_point(run_dir, command, overrides)
    cfg = apply_overrides(cfg, overrides, command, config_dir)
    device = resolve_device(cfg.device)
    data = build_data(cfg).to(device)
    if command == "stitch":  # the anchors come from their own run folders, the stitches from this one
        from modrun.methods.stitch.load import stitched_from_run

        model, state = stitched_from_run(run_dir, data, device, weights, point), None
    else:
        model, state = _model_and_weights(cfg, run_dir, status, data, device, weights)
    if state is not None:
        load_into(model, state, str(run_dir))  # a tied matrix saved once fills its aliases
    prep = Preprocess(data, device)
    bs = int(cfg.data.eval_batch_size)
    if size is not None:  # one size of a nested run, cut out (and saved) as a model of its own
        from modrun.methods.nested.subnet import export

        model = export(run_dir, cfg, model, size, data, prep, weights)
    hooks = skip_blocks(model, skip) if skip else []  # test-time depth: nothing of the run is changed
    with torch.no_grad():
        results = {split: evaluate(model, getattr(data, split), prep, bs, device) for split in ("val", "test")}
    for h in hooks:
        h.remove()
    return _report(run_dir, results, weights, overrides, size, point, skip)


def _model_and_weights(
    cfg: DictConfig, run_dir: Path, status: dict, data: object, device: object, weights: str
) -> tuple[object, dict]:
    """The run's model (pruned layers rebuilt) and the state dict to load into it."""
    from modrun.components.build import build_model
    from modrun.components.shapes import apply_shapes, read_shapes
    from modrun.core import checkpoint

    model = build_model(cfg.model, data)
    shapes = read_shapes(run_dir)
    if shapes:  # structurally pruned: rebuild the smaller layers first
        apply_shapes(model, shapes)
    model = model.to(device)
    if weights == "final":
        if not (run_dir / "model.safetensors").exists():
            raise UserError(f"{run_dir} has no model.safetensors (state {status.get('state')}); try --weights best")
        from modrun.core.artifacts import load_state

        state = {k: v.to(device) for k, v in load_state(run_dir / "model.safetensors").items()}
    elif weights in ("best", "last"):
        path = run_dir / "checkpoints" / f"{weights}.pt"
        if not path.exists():
            raise UserError(f"{run_dir} has no checkpoints/{weights}.pt")
        state = checkpoint.load(path, device, run_dir)["modules"]["model"]  # checksum, weights_only
    else:
        raise UserError(f"--weights must be final, best or last, got '{weights}'")
    return model, state


def _report(
    run_dir: Path, results: dict, weights: str, overrides: list[str], size: object, point: int | None, skip: list[int]
) -> dict:
    """Append the scores to evals.jsonl and print them (with the recorded final score where comparable)."""
    from modrun.core.records import section, try_json
    from modrun.methods.nested.base import size_name
    from modrun.methods.nested.subnet import size_row

    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "weights": weights,
        "overrides": overrides,
        **({"nested": size_row(size)} if size is not None else {}),
        **({"stitch.point": point} if point is not None else {}),
        **({"skip": skip} if skip else {}),
        **{f"{s}/{k}": v for s, r in results.items() for k, v in r.items()},
    }
    append_line(run_dir / "evals.jsonl", json.dumps(record))
    columns = list(next(iter(results.values())))  # the task's metrics: top1/top5, or ppl/bpb for text
    skipped = f", blocks {skip} skipped" if skip else ""
    sized = f", nested size {size_name(size)}" if size is not None else ""
    table = Table("split", *columns, title=f"{run_dir} ({weights} weights{sized}{skipped})")
    for split, r in results.items():
        table.add_row(split, *(f"{r[k]:.4f}" if k in ("loss", "bpb") else f"{r[k]:.2f}" for k in columns))
    Console().print(table)
    plain = not overrides and size is None and point is None and not skip and weights == "final"
    if (run_dir / "summary.json").exists() and plain:
        key = "test/bpb" if "bpb" in columns else "test/top1"
        recorded = section(try_json(run_dir / "summary.json")[0], "final").get(key)
        if isinstance(recorded, (int, float)):
            Console().print(f"recorded {key} at the end of training: {recorded:.4g}")
    return record
