"""Checks only `modrun distill` needs, before any work: teacher sources, layer paths, the teacher cache."""

from __future__ import annotations

# imports inside functions here defer torch: validation runs these checks before torch is loaded
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from modrun.core.errors import UserError
from modrun.core.values import is_number
from modrun.methods.distill.teachers import TEACHER_KEYS


def check(cfg: DictConfig) -> list[str]:
    from modrun.methods.distill.cache import check_cache

    errors = check_cache(cfg) + check_kd_values(cfg)
    t = cfg.teacher
    runs = list(t.run) if isinstance(t.run, ListConfig) else ([t.run] if t.run else [])
    teacher_nodes = []
    for run in runs:
        node, problems = run_source(run, "teacher.run")
        errors += problems
        teacher_nodes += [node] if node is not None else []
    node = OmegaConf.create({k: v for k, v in t.items() if k not in TEACHER_KEYS})
    if t.checkpoint:
        errors += checkpoint_problems(t.checkpoint, node, "teacher.checkpoint")
    if t.run and t.checkpoint:
        errors.append("teacher.run and teacher.checkpoint are both set; give one")
    if cfg.kd.teacher_mode not in ("mean", "each"):
        errors.append(f"kd.teacher_mode={cfg.kd.teacher_mode}: expected mean or each")
    if not runs:
        teacher_nodes = [node]
    if not errors:
        errors += check_layers(cfg, teacher_nodes)
    return errors


# KD hyper-parameters by name, wherever they appear under kd (terms, m2m): > 0, or >= 0
POSITIVE = {"temperature", "nce_t", "feat_dim", "nce_k", "mid_channels", "p", "eps", "init_pred_var"}
NON_NEGATIVE = {"weight", "task_weight", "stage_weight", "logit_weight", "alpha", "beta", "gamma", "epochs"}
NON_NEGATIVE |= {"distance_weight", "angle_weight", "nce_m", "warmup_epochs"}
CHOICES = {"objective": ("nce", "infonce")}  # crd


def check_kd_values(cfg: DictConfig) -> list[str]:
    """A temperature of 0 divides by zero, a negative weight turns a loss term into a reward: bad input."""
    errors = []
    kd = cfg.get("kd")
    nodes = [("kd", kd)] if isinstance(kd, DictConfig) else []
    while nodes:
        path, node = nodes.pop(0)
        for key, value in node.items():
            if isinstance(value, DictConfig):
                nodes.append((f"{path}.{key}", value))
            elif key in CHOICES and value not in CHOICES[key]:
                errors.append(f"{path}.{key}={value}: expected one of {', '.join(CHOICES[key])}")
            elif is_number(value):
                if key in POSITIVE and not value > 0:
                    errors.append(f"{path}.{key}={value}: must be > 0")
                elif key in NON_NEGATIVE and not value >= 0:
                    errors.append(f"{path}.{key}={value}: must be >= 0")
    return errors


def run_source(run: object, key: str) -> tuple[DictConfig | None, list[str]]:
    """A teacher.run / source.run folder: a completed modrun run whose weights fit its own model config.

    Returns that model config (None when unreadable) and the problems, checked on the meta device."""
    from modrun.components.shapes import read_shapes
    from modrun.core.runfolder import read_json

    if not isinstance(run, str) or not run:
        return None, [f"{key}={run}: expects the path of a run folder"]
    folder = Path(run)
    if not (folder / "config.yaml").is_file():
        return None, [f"{key}={run}: not a modrun run folder (no config.yaml)"]
    try:
        node = OmegaConf.load(folder / "config.yaml").model
        state = read_json(folder / "status.json").get("state") if (folder / "status.json").is_file() else None
        shapes = read_shapes(folder)
    except Exception as e:  # noqa: BLE001 - a damaged folder is bad input
        return None, [f"{key}={run}: cannot read its record ({type(e).__name__}: {str(e).splitlines()[0]})"]
    if state != "completed":
        return node, [f"{key}={run}: that run is {state}, not completed; resume it first"]
    if not (folder / "model.safetensors").is_file():
        return node, [f"{key}={run}: that run has no model.safetensors"]
    return node, checkpoint_problems(str(folder / "model.safetensors"), node, key, shapes, shown=run)


def checkpoint_problems(
    path: object, node: DictConfig, key: str, shapes: dict | None = None, shown: object = None
) -> list[str]:
    """Whether the weights file at `path` loads into the model of `node` (a run's pruned `shapes` applied)."""
    from modrun.components.drybuild import build_on_meta
    from modrun.core.artifacts import fit_problem, weight_shapes

    shown = path if shown is None else shown
    if not isinstance(path, str) or not Path(path).is_file():
        return [f"{key}={shown}: no such file"]
    try:
        have = weight_shapes(Path(path))
    except UserError as e:
        return [f"{key}={shown}: {m}" for m in e.messages]
    try:
        model = build_on_meta(node)
        if shapes:
            import torch

            from modrun.components.shapes import apply_shapes

            with torch.device("meta"):
                apply_shapes(model, shapes)
    except Exception:  # noqa: BLE001 - the model's own arguments are checked (and reported) elsewhere
        return []
    problem = fit_problem(model, have)
    return [f"{key}={shown}: weights do not fit the model '{node.get('name')}': {problem}"] if problem else []


def check_layers(cfg: DictConfig, teacher_nodes: list[DictConfig]) -> list[str]:
    """Layer paths of every KD term, checked against the models built on the meta device (no memory, no time)."""
    import torch

    from modrun.components.build import component_args
    from modrun.core.registry import MODELS
    from modrun.methods.distill.capture import resolve_layers

    def build(node: DictConfig) -> torch.nn.Module:
        with torch.device("meta"):
            return MODELS.get(node.name)(**component_args(node, {"name", *TEACHER_KEYS}))

    errors = []
    try:
        student, teachers = build(cfg.model), [build(n) for n in teacher_nodes]
    except Exception as e:  # noqa: BLE001 - a model that cannot be built is reported, not raised
        return [f"model: cannot build ({type(e).__name__}: {e})"]
    if cfg.kd.get("m2m") is not None:
        errors += _check_m2m(cfg, student, teachers[0])
    for key, term in (cfg.kd.terms or {}).items():
        for role, models in (("student_layer", [student]), ("teacher_layer", teachers)):
            for model in models:
                try:
                    resolve_layers(model, term.get(role), f"kd.terms.{key}.{role}")
                except UserError as e:
                    errors += e.messages
    return sorted(set(errors), key=errors.index)


def _check_m2m(cfg: DictConfig, student, teacher) -> list[str]:  # noqa: ANN001
    """m2m stages checked on meta tensors: no memory, no time."""
    from modrun.methods.distill.m2m import m2m_problems

    return m2m_problems(cfg, student, teacher)
