"""What `modrun soup` is asked: its settings (soup.yaml + key=value overrides) and its ingredient runs."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import cast

from omegaconf import DictConfig, OmegaConf

from modrun.core.errors import UserError, did_you_mean
from modrun.core.records import inside, read_json
from modrun.core.values import DEVICE, is_number, suggest_key, type_problem

SOUPS = ("uniform", "greedy", "task_arithmetic")
OBJECTIVES = ("val/top1", "val/top5", "val/loss", "val/bpb", "val/ppl")  # the ones the ingredients' task reports


def defaults() -> DictConfig:
    """The packaged soup.yaml (found as a package resource, so it works from a wheel as from a checkout)."""
    text = resources.files("modrun.conf").joinpath("soup.yaml").read_text()
    return cast(DictConfig, OmegaConf.create(text))  # a YAML mapping


def settings(overrides: list[str]) -> DictConfig:
    """soup.yaml with `key=value` overrides, checked: unknown keys, types and choices are bad input."""
    cfg, errors = defaults(), []
    known = set(cfg)
    for o in overrides:
        key = o.split("=", 1)[0]
        if key.startswith("layer_scales.") and key.count(".") >= 1:  # a module path: layer_scales.layers.0=0.5
            value = OmegaConf.from_dotlist([o])
            scale = OmegaConf.select(value, key)
            if is_number(scale):
                cfg.layer_scales[key.split(".", 1)[1]] = float(scale)
            else:
                errors.append(f"{o}: a layer scale must be a number")
            continue
        if key not in known:
            errors.append(f"unknown key {key}{suggest_key(key, known)}")
            continue
        value = OmegaConf.from_dotlist([o])[key]
        problem = type_problem(cfg[key], value)
        if problem:
            errors.append(f"{o}: {problem}")
        else:
            cfg[key] = value
    for key, choices in (("soup", SOUPS), ("objective", OBJECTIVES)):
        if not errors and cfg[key] not in choices and not (key == "objective" and cfg[key] is None):
            errors.append(f"{key}={cfg[key]}: expected one of {', '.join(choices)}{did_you_mean(cfg[key], choices)}")
    if not errors and not DEVICE.match(str(cfg.device)):
        errors.append(f"device={cfg.device}: expected auto, cpu, cuda, cuda:N or mps")
    if errors:
        raise UserError(*errors)
    return cfg


def split_args(args: list[str]) -> tuple[list[Path], list[str]]:
    """Existing folders are runs or sweeps (their names may hold '='), other `key=value` are overrides."""
    paths, overrides = [], []
    for a in args:
        if Path(a).is_dir():
            paths.append(Path(a))
        elif "=" in a:
            overrides.append(a)
        else:
            raise UserError(f"'{a}' is not a folder (expected run or sweep folders, then key=value overrides)")
    if not paths:
        raise UserError("no runs given: modrun soup runs/sweeps/<sweep> or modrun soup RUN_DIR RUN_DIR ...")
    return paths, overrides


def expand_runs(paths: list[Path]) -> tuple[list[Path], list[str]]:
    """Run folders of the arguments: a sweep folder stands for its completed jobs. Returns runs and notes."""
    runs, notes = [], []
    for path in paths:
        if (path / "sweep.json").is_file():
            record = path / "sweep.json"
            jobs = read_json(record).get("jobs")  # a damaged sweep.json: one line naming it
            if not isinstance(jobs, list) or not all(isinstance(j, dict) and "run_dir" in j for j in jobs):
                raise UserError(f"{record}: expected {{'jobs': [{{'run_dir': ..., 'state': ...}}]}}")
            for run in (inside(path, j["run_dir"], record) for j in jobs):  # a job's folder is inside the sweep
                state = _state(run)  # the run's own status.json is authoritative, not the sweep's record
                if state == "completed":
                    runs.append(run)
                else:
                    notes.append(f"skipping {run}: {state or 'no run folder'}, not completed")
        elif (path / "status.json").is_file():
            if _state(path) != "completed":
                raise UserError(f"{path}: that run is {_state(path)}, not completed; resume it first")
            runs.append(path)
        else:
            raise UserError(f"'{path}' is neither a run folder (status.json) nor a sweep folder (sweep.json)")
    if len(runs) < 2:
        raise UserError(f"a soup needs at least 2 completed runs, found {len(runs)} in {', '.join(map(str, paths))}")
    return runs, notes


def _state(run: Path) -> str | None:
    state = read_json(run / "status.json").get("state") if (run / "status.json").is_file() else None
    return None if state is None else str(state)
