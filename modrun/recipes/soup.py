"""`modrun soup RUNS... [key=value ...]`: average the weights of compatible runs into one model.

Uniform and greedy soups follow Wortsman et al. 2022 ("Model soups"); sparse ingredients must share one
pruning mask, which averaging then keeps (Zimmer et al. 2023, "Sparse Model Soups").
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from modrun.components.build import build_data, build_model, resolve_device
from modrun.components.data.base import Preprocess
from modrun.components.data.tasks import CLASSIFICATION, language_modeling
from modrun.components.shapes import SHAPES_FILE, apply_shapes, read_shapes
from modrun.core import index
from modrun.core.artifacts import load_into, load_run_config, load_state, prerequisite_record, save_weights
from modrun.core.checkpoint import seed_everything
from modrun.core.cost import count_params
from modrun.core.errors import UserError
from modrun.core.records import optional_json
from modrun.core.registry import split_imports, trusted_imports
from modrun.core.runfolder import (
    PREREQUISITES,
    atomic_write,
    log_to,
    read_json,
    reserve_run_dir,
    set_status,
    write_json,
    write_record,
)
from modrun.core.summary import direction_of
from modrun.engine.evaluation import evaluate
from modrun.methods.soup import merge
from modrun.methods.soup.inputs import MERGES, expand_runs, settings, split_args
from modrun.methods.soup.merge import check_layer_scales, check_lines, find_base

log = logging.getLogger("modrun")
# data keys that change how a run trained, not what it is evaluated on
DATA_KEYS_IGNORED = {"batch_size", "eval_batch_size", "num_workers", "augment"}


def load_ingredient(run: Path) -> dict[str, Any]:

    cfg, _ = load_run_config(run)
    if not (run / "model.safetensors").is_file():
        raise UserError(f"{run} has no model.safetensors")
    for node in ("model", "data"):
        if not isinstance(cfg.get(node), DictConfig):
            raise UserError(f"{run / 'config.yaml'}: no {node} node (a mapping naming the {node})")
    summary = optional_json(run / "summary.json", default={})  # a damaged one: one line naming it
    return {"run": run, "cfg": cfg, "state": load_state(run / "model.safetensors"), "summary": summary}


def _first_diff(a: Any, b: Any, prefix: str, first: Path) -> str | None:
    """The first dotted key where two plain config trees differ, said as `key=b but FIRST has a`."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            diff = _first_diff(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{prefix}.{k}", first)
            if diff:
                return diff
        return None
    return None if a == b else f"{prefix}={b} but {first} has {a}"


def check_compatible(ings: list[dict[str, Any]]) -> None:
    """Same model config, data config (batch sizes aside), layer shapes and state-dict keys and shapes."""

    def node(cfg: DictConfig, key: str) -> dict:
        tree = OmegaConf.to_container(cfg[key], resolve=True)
        return {k: v for k, v in tree.items() if key != "data" or k not in DATA_KEYS_IGNORED}

    first = ings[0]
    for ing in ings[1:]:
        diff = _first_diff(node(first["cfg"], "model"), node(ing["cfg"], "model"), "model", first["run"])
        diff = diff or _first_diff(node(first["cfg"], "data"), node(ing["cfg"], "data"), "data", first["run"])
        if not diff and read_shapes(first["run"]) != read_shapes(ing["run"]):
            diff = f"its {SHAPES_FILE} (pruned layer sizes) differs from that of {first['run']}"
        a, b = first["state"], ing["state"]
        key = next((k for k in sorted(set(a) | set(b)) if k not in a or k not in b or a[k].shape != b[k].shape), None)
        if not diff and key is not None:
            shape = tuple(b[key].shape) if key in b else "<missing>"
            diff = f"weights {key} {shape} but {first['run']} has {tuple(a[key].shape) if key in a else '<missing>'}"
        if diff:
            raise UserError(f"{ing['run']}: {diff} — soup ingredients need the same model, data and weight shapes")


def shared_masks(ings: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Masks of the layers that are sparse in any ingredient; every ingredient must have the same one."""
    masks = {}
    for key, w in ings[0]["state"].items():
        if not (key.endswith("weight") and w.dim() >= 2):
            continue
        per_run = [ing["state"][key] != 0 for ing in ings]
        if all(bool(m.all()) for m in per_run):
            continue  # dense in every ingredient
        for ing, m in zip(ings[1:], per_run[1:], strict=True):
            if not torch.equal(m, per_run[0]):
                raise UserError(
                    f"runs {ings[0]['run']} and {ing['run']} have different sparsity masks in layer "
                    f"{key.removesuffix('.weight')} — sparse soups need a shared mask "
                    "(e.g. the same pruning run fine-tuned with different seeds)"
                )
        masks[key] = per_run[0]
    return masks


def average(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Uniform mean of float tensors (BatchNorm statistics too); integer buffers (num_batches_tracked) of the first."""
    out = {}
    for key, t in states[0].items():
        if t.is_floating_point():  # low precision is accumulated in float32
            out[key] = torch.stack([s[key].float() for s in states]).mean(dim=0).to(t.dtype)
        else:
            out[key] = t.clone()
    return out


def make_scorer(src: DictConfig, run: Path, state: dict[str, torch.Tensor], device_name: str) -> tuple[Any, Any]:
    """The ingredients' model on the device and `score(state, splits)`: its metrics with those weights."""

    device = resolve_device(device_name)
    data = build_data(src).to(device)
    model = build_model(src.model, data)
    if read_shapes(run):  # structurally pruned ingredients: rebuild their smaller layers first
        apply_shapes(model, read_shapes(run))
    load_into(model, state, str(run)).to(device)  # weights that do not fit are bad input, found before any work
    prep, bs = Preprocess(data, device), int(src.data.eval_batch_size)

    def score(state: dict[str, torch.Tensor], splits: tuple[str, ...] = ("val", "test")) -> dict[str, float]:
        model.load_state_dict(state)
        with torch.no_grad():
            results = {s: evaluate(model, getattr(data, s), prep, bs, device) for s in splits}
        return {f"{s}/{k}": v for s, r in results.items() for k, v in r.items()}

    return model, score


def cook(cfg: DictConfig, rows: list[dict], states: list[dict], score: Any) -> dict[str, torch.Tensor]:
    """Uniform: the mean of all. Greedy (Wortsman et al.): best first by own val score, then add each next
    ingredient if the soup's val score does not get worse. Marks `kept` (and greedy's trace) in `rows`."""
    if cfg.soup == "uniform":
        return average(states)
    higher, key = direction_of(cfg.objective) == "maximize", cfg.objective
    order = sorted(range(len(states)), key=lambda i: rows[i][key], reverse=higher)
    kept, best = [order[0]], score(states[order[0]], ("val",))[key]
    rows[order[0]].update(kept=True, rank=1, soup_val=best)
    for rank, i in enumerate(order[1:], start=2):
        val = score(average([states[j] for j in [*kept, i]]), ("val",))[key]
        accept = val >= best if higher else val <= best
        rows[i].update(kept=accept, rank=rank, soup_val=val)
        if accept:
            kept, best = [*kept, i], val
        log.info(f"{'kept' if accept else 'left out'} {rows[i]['run']}: soup {key} {val:.4f}")
    return average([states[j] for j in kept])


def soup_runs(args: list[str]) -> int:
    """The `modrun soup` command: check everything, then write the soup's run folder. Returns the exit code."""

    given, args = split_imports(args)  # the user's own modules: never those an ingredient's config.yaml names
    paths, overrides = split_args(args)
    cfg = settings(overrides)
    runs, notes = expand_runs(paths)
    ings = [load_ingredient(run) for run in runs]
    check_compatible(ings)
    masks = shared_masks(ings)
    base = None
    if cfg.soup in MERGES:  # the base the task vectors start from must fit the runs too
        base = load_ingredient(find_base(cfg, ings))
        check_compatible([base, *ings])
        check_layer_scales(cfg, base["state"])
    src = ings[0]["cfg"]
    if cfg.objective is None:  # the ingredients' task's best-epoch metric: val/top1, or val/loss for text
        task = (src.get("data") or {}).get("task", "classification")
        cfg.objective = f"val/{(language_modeling() if task == 'language_modeling' else CLASSIFICATION).best}"
    metric = cfg.objective.split("/")[1]
    for ing in ings:
        trusted_imports(ing["cfg"], given, ing["run"] / "config.yaml")
    seed_everything(int(cfg.seed))
    model, score = make_scorer(src, runs[0], ings[0]["state"], str(cfg.device))
    blocks = tuple(getattr(model, "feature_layers", ()) or ())
    check_lines(cfg, blocks)
    # the soup records where its model and data came from, so `modrun eval` rebuilds it from this folder
    extra = {"imports": src.imports} if src.get("imports") else {}
    record = OmegaConf.merge(cfg, {"ingredients": list(map(str, runs)), "model": src.model, "data": src.data}, extra)
    run_dir = reserve_run_dir(Path(cfg.runs_dir), "soup", str(cfg.name))
    write_record(run_dir, record, "soup", overrides)
    if base is not None:  # recorded as every run's prerequisites are (`modrun runs show` lists it)
        how = "given" if cfg.base else "the source.run of every ingredient"
        command = _status(base["run"]).get("command")
        key = index.semantic_key(command, base["cfg"]) if isinstance(command, str) else None
        write_json(run_dir / PREREQUISITES, [prerequisite_record("base", "base", base["run"], how, key)])
    if read_shapes(runs[0]):
        atomic_write(run_dir / SHAPES_FILE, (runs[0] / SHAPES_FILE).read_text())
    t0, merged = time.time(), {}
    with log_to(run_dir):
        set_status(run_dir, "running", command="soup")
        log.info(f"{cfg.soup} soup of {len(ings)} runs in {run_dir}")
        for note in notes:
            log.info(note)
        try:
            rows = []
            for ing in ings:  # each ingredient's own scores: from its summary, else evaluated now
                final = ing["summary"].get("final", {})
                own = {k: final[k] for k in (f"val/{metric}", f"test/{metric}") if k in final}
                if len(own) < 2:
                    own = {k: v for k, v in score(ing["state"]).items() if k.endswith(metric)}
                rows.append({"run": str(ing["run"]), **own, "kept": True})
            if base is None:
                soup = cook(cfg, rows, [ing["state"] for ing in ings], score)
            else:
                order = list(model.state_dict())  # the model's own order: safetensors files sort their keys
                soup, scale = merge.cook(cfg, rows, [ing["state"] for ing in ings], base["state"], score, blocks, order)
                soup = {k: v * masks[k] if k in masks else v for k, v in soup.items()}  # a shared mask stays
                merged.update(base=str(base["run"]), scale=scale, **_method_settings(cfg))
            for key, mask in masks.items():  # averaging keeps zeros; checked, since the mask is the point
                if bool(soup[key][~mask].any()):
                    raise RuntimeError(f"the soup lost the shared sparsity mask in {key}")
            final = score(soup)
            save_weights(run_dir, model)  # the model holds the soup: score() loaded it last
        except (Exception, KeyboardInterrupt) as e:  # status.json says how it ended; no weights are written
            stopped = isinstance(e, KeyboardInterrupt)
            set_status(run_dir, "interrupted" if stopped else "failed", error=f"{type(e).__name__}: {e}")
            log.error("interrupted" if stopped else "failed with an exception:\n" + traceback.format_exc())
            return 130 if stopped else 1
        write_json(run_dir / "ingredients.json", rows)
        sign = 1 if direction_of(cfg.objective) == "maximize" else -1
        summary = {
            "final": final,
            "best": dict(final),  # a soup is one set of weights: its best is its final
            "soup": cfg.soup,
            "objective": cfg.objective,
            "ingredients": len(rows),
            "kept": sum(r["kept"] for r in rows),
            **count_params(model),
            "sparsity": _sparsity(masks, ings[0]["state"], soup),
            **merged,  # task arithmetic: the base and the scale used
            "best_ingredient": max(rows, key=lambda r: sign * r[cfg.objective]),
            "wall_time_s": round(time.time() - t0, 3),
        }
        write_json(run_dir / "summary.json", summary)
        if masks:  # report it: the mask is what a sparse soup must keep
            sp = summary["sparsity"]
            log.info(f"shared mask kept in {sp['layers']} layers: {sp['soup']:.2%} zeros (was {sp['ingredients']:.2%})")
        set_status(run_dir, "completed")
        log.info(f"completed: {run_dir}")
    _print_table(rows, final, cfg, metric, run_dir)
    return 0


def _method_settings(cfg: DictConfig) -> dict[str, Any]:
    """What summary.json records of the merging method beside the base and the scale."""
    out: dict[str, Any] = {"density": cfg.density} if cfg.soup == "ties" else {}
    out.update({"drop_rate": cfg.drop_rate, "seed": cfg.seed} if cfg.soup == "dare" else {})
    if cfg.lines.alpha is not None:
        out["lines"] = {"alpha": cfg.lines.alpha, "beta": cfg.lines.beta}
    return out


def _status(run: Path) -> dict[str, Any]:
    try:
        status = read_json(Path(run) / "status.json")
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def _sparsity(masks: dict[str, torch.Tensor], first: dict, soup: dict) -> dict[str, Any]:
    """Zero fraction of the sparse layers in the ingredients (shared mask) and in the soup."""
    total = max(sum(m.numel() for m in masks.values()), 1)
    zeros = {name: sum(int((s[k] == 0).sum()) for k in masks) for name, s in (("ingredients", first), ("soup", soup))}
    return {"layers": len(masks), **{name: z / total for name, z in zeros.items()}}


def _print_table(rows: list[dict], final: dict, cfg: DictConfig, metric: str, run_dir: Path) -> None:
    fmt = "{:.4f}" if direction_of(metric) == "minimize" else "{:.2f}"
    table = Table("ingredient", f"val/{metric}", f"test/{metric}", "kept", title=f"{cfg.soup} soup: {run_dir}")
    for r in [*rows, {"run": "[bold]soup[/bold]", **final, "kept": None}]:
        kept = {True: "yes", False: "no", None: ""}[r["kept"]]
        table.add_row(r["run"], fmt.format(r[f"val/{metric}"]), fmt.format(r[f"test/{metric}"]), kept)
    Console(width=None if sys.stdout.isatty() else 160).print(table)
