"""What `modrun soup` is asked: its settings (soup.yaml + key=value overrides) and its ingredient runs."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import cast

from omegaconf import DictConfig, OmegaConf

from modrun.core.errors import UserError, did_you_mean
from modrun.core.records import inside, read_json
from modrun.core.values import DEVICE, is_number, suggest_key, type_problem

SOUPS = ("uniform", "greedy", "task_arithmetic", "ties", "dare")
MERGES = ("task_arithmetic", "ties", "dare")  # soups of task vectors against a common base
ALIASES = {"soup.density": "density", "soup.drop_rate": "drop_rate"}  # `soup=ties soup.density=0.2` reads well
OBJECTIVES = ("val/top1", "val/top5", "val/loss", "val/bpb", "val/ppl")  # the ones the ingredients' task reports


def defaults() -> DictConfig:
    """The packaged soup.yaml (found as a package resource, so it works from a wheel as from a checkout)."""
    text = resources.files("modrun.conf").joinpath("soup.yaml").read_text()
    return cast(DictConfig, OmegaConf.create(text))  # a YAML mapping


def settings(overrides: list[str]) -> DictConfig:
    """soup.yaml with `key=value` overrides, checked: unknown keys, types and choices are bad input."""
    cfg, errors = defaults(), []
    known = {*cfg, "lines.alpha", "lines.beta"}
    for o in overrides:
        key = o.split("=", 1)[0]
        if key in ALIASES:
            key, o = ALIASES[key], ALIASES[key] + o[len(key) :]
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
        value = OmegaConf.select(OmegaConf.from_dotlist([o]), key)
        problem = type_problem(OmegaConf.select(cfg, key), value)
        if problem:
            errors.append(f"{o}: {problem}")
        else:
            OmegaConf.update(cfg, key, value)
    for key, choices in (("soup", SOUPS), ("objective", OBJECTIVES)):
        if not errors and cfg[key] not in choices and not (key == "objective" and cfg[key] is None):
            errors.append(f"{key}={cfg[key]}: expected one of {', '.join(choices)}{did_you_mean(cfg[key], choices)}")
    if not errors:
        errors += _merge_problems(cfg)
    if not errors and not DEVICE.match(str(cfg.device)):
        errors.append(f"device={cfg.device}: expected auto, cpu, cuda, cuda:N or mps")
    if errors:
        raise UserError(*errors)
    return cfg


def _merge_problems(cfg: DictConfig) -> list[str]:
    """The merging methods' own settings: TIES's density, DARE's drop rate, LiNeS's alpha and beta."""
    density, drop, lines = cfg.density, cfg.drop_rate, cfg.lines
    if cfg.soup == "ties" and not (is_number(density) and 0 < density <= 1):
        return [f"density={density}: soup=ties keeps this fraction of each task vector; must be in (0, 1]"]
    if cfg.soup == "dare" and not (is_number(drop) and 0 <= drop < 1):
        return [f"drop_rate={drop}: soup=dare drops task-vector entries with this probability; must be in [0, 1)"]
    given = [k for k in ("alpha", "beta") if lines.get(k) is not None]
    if given and (len(given) == 1 or not all(is_number(lines[k]) for k in given)):
        return [f"lines.alpha={lines.get('alpha')} lines.beta={lines.get('beta')}: LiNeS needs both, as numbers"]
    if given and cfg.soup not in MERGES:
        return [f"lines.alpha: LiNeS scales task vectors: use soup={' | '.join(MERGES)}, not soup={cfg.soup}"]
    return []


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
