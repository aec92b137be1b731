"""Checks of a composed config: missing values, unknown keys, wrong types, registry names, component arguments."""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, OmegaConfBaseException

from modrun.components.data import RUNNER_KEYS
from modrun.components.models import MODEL_TASKS
from modrun.core.errors import UserError, did_you_mean
from modrun.core.registry import (
    DATASETS,
    KD_METHODS,
    LOGGERS,
    MODELS,
    OPTIMIZERS,
    PRUNERS,
    SCHEDULERS,
    Registry,
    missing_package,
)
from modrun.core.values import DEVICE, is_number, suggest_key, type_problem
from modrun.methods.distill import TERM_KEYS
from modrun.methods.prune import RUNNER_KEYS as PRUNE_KEYS


@dataclass
class Component:
    """A config node that names a registered component; its other keys are the component's arguments."""

    node: str
    registry: Registry
    runner_args: int = 0  # leading parameters the runner fills in (params, optimizer, steps)
    runner_keys: set[str] = field(default_factory=lambda: {"name"})


COMPONENTS = [
    Component("model", MODELS),
    Component("data", DATASETS, runner_keys=RUNNER_KEYS),
    Component("optim", OPTIMIZERS, runner_args=1),
    Component("sched", SCHEDULERS, runner_args=3),
    Component("logger", LOGGERS, runner_args=3),  # run_dir, phase, resume_step
    Component("prune", PRUNERS, runner_args=1, runner_keys=PRUNE_KEYS),
]
TEACHER_RUNNER_KEYS = {"name", "run", "checkpoint", "seed", "epochs", "overrides"}  # teacher.* keys not of its model
TEACHER = Component("teacher", MODELS, runner_keys=TEACHER_RUNNER_KEYS)
OPTIONAL_TOP_LEVEL = {"imports"}  # may be added with +key=... although no packaged config sets it
OPTIONAL_NODES = {"sweep", "logger", "nested"}  # read with .get(): a run goes on without them
# keys added after run folders were written without them; read with .get() and their default
LATER_KEYS = {"trainer.accumulate_grad_batches", "trainer.find_unused_parameters", "trainer.strategy"}
INT64_MAX = 2**63 - 1
MAX_NAME = 200  # bytes: with the timestamp and a sweep's command prefix, a folder name stays under 255


def components(cfg: DictConfig) -> list[tuple[str, Component]]:
    """(config path, component) of every node of `cfg` that names a registered component."""
    found = [(c.node, c) for c in [*COMPONENTS, TEACHER] if c.node in cfg]
    terms = OmegaConf.select(cfg, "kd.terms")
    if isinstance(terms, DictConfig):
        found += [(f"kd.terms.{k}", Component(f"kd.terms.{k}", KD_METHODS, 1, TERM_KEYS)) for k in terms]
    return found


def check_config(cfg: DictConfig, reference: DictConfig) -> list[str]:
    """Problems of a composed config: missing values, unknown keys, wrong types, registry names, arguments."""
    errors = [f"missing value for {k} (set {k}=...)" for k in _missing_keys(cfg)]
    if errors:
        return errors  # the checks below need values
    found = components(cfg)
    ref_keys = set(dotted_keys(reference))
    for key in dotted_keys(cfg):
        if key.split(".")[0] in OPTIONAL_TOP_LEVEL or any(key.startswith(path + ".") for path, _ in found):
            continue
        if key not in ref_keys and not _under_free_node(key, reference):
            errors.append(f"unknown key {key}{suggest_key(key, ref_keys)}")
            continue
        problem = type_problem(OmegaConf.select(reference, key), OmegaConf.select(cfg, key), key)
        if problem and not isinstance(OmegaConf.select(cfg, key), (DictConfig, ListConfig)):
            errors.append(f"{key}={OmegaConf.select(cfg, key)}: {problem}")
    for path, component in found:
        errors += _check_component(cfg, path, component)
    errors += _check_values(cfg)
    imports = cfg.get("imports")
    if imports is not None and (not isinstance(imports, ListConfig) or not all(isinstance(m, str) for m in imports)):
        errors.append(f"imports={imports}: expects a list of module names, e.g. +imports=[my_models]")
    return errors


def check_deletions(cfg: DictConfig, reference: DictConfig) -> list[str]:
    """Keys that `~key` removed although the run reads them: only a component's own arguments (its factory's
    defaults apply), a KD term, or optional nodes may go."""
    have, found, errors = set(dotted_keys(cfg)), dict(components(reference)), []
    for key in dotted_keys(reference):
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        if key in have or (parent and parent not in have) or key.split(".")[0] in OPTIONAL_NODES or key in LATER_KEYS:
            continue  # present, or inside a node whose deletion is reported already
        if parent == "kd.terms" or _under_free_node(key, reference) or _is_argument(cfg, parent, key, found):
            continue
        errors.append(f"~{key}: {key} is needed by the run; set {key}=... instead of deleting it")
    return errors


def _is_argument(cfg: DictConfig, parent: str, key: str, found: dict[str, Component]) -> bool:
    if parent not in found:
        return False
    c, name, leaf = found[parent], OmegaConf.select(cfg, f"{parent}.name"), key.rsplit(".", 1)[-1]
    if leaf in c.runner_keys:
        return False
    if not isinstance(name, str) or name not in c.registry:
        return True  # an unknown component name is reported by check_config
    params = inspect.signature(c.registry.get(name)).parameters
    return leaf in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def check_tasks(cfg: DictConfig) -> list[str]:
    """Every model serves the data's task (a language model on text, a classifier on images); checked before
    interpolations such as ${data.vocab_size} are resolved, so the message says what is really wrong."""
    data = cfg.get("data")
    if not isinstance(data, DictConfig) or "name" not in data:
        return []
    task = str(data.get("task", "classification"))
    errors = []
    for path in ("model", "teacher", "source.model"):
        node = OmegaConf.select(cfg, path, throw_on_missing=False)
        if not isinstance(node, DictConfig) or not isinstance(node.get("name"), str):
            continue
        serves = MODEL_TASKS.get(node.name) or getattr(MODELS.loaded(node.name), "task", None)
        if serves is None or serves == task:  # a model of one's own that declares no task is not checked
            errors += _window_problem(cfg, path)
            continue
        if serves == "language_modeling":
            errors.append(
                f"{path}={node.name} is a language model but data={data.name} is {task}; "
                "choose data=python_docs, python_code or text_file"
            )
        else:
            errors.append(f"{path}={node.name} classifies images but data={data.name} is {task}; choose model=gpt")
    return errors


def _window_problem(cfg: DictConfig, path: str) -> list[str]:
    """A language model reads windows of at most its block_size tokens."""
    try:
        have = OmegaConf.select(cfg, f"{path}.block_size", throw_on_missing=False)
        want = OmegaConf.select(cfg, "data.block_size", throw_on_missing=False)
    except OmegaConfBaseException:
        return []  # an interpolation that points nowhere: check_resolvable says so
    if not (is_number(have) and is_number(want)) or want <= have:
        return []
    return [f"data.block_size={want} is longer than {path}.block_size={have}; set data.block_size<={have}"]


def check_resolvable(cfg: DictConfig) -> list[str]:
    """Interpolations that point nowhere (e.g. name=${model.name} after a deletion), as one line each."""
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except InterpolationToMissingValueError:
        return []  # a missing value (???): check_config names it where it lives
    except OmegaConfBaseException as e:
        said = _user_error(e)
        if said is not None:  # a resolver of modrun's (modrun_vocab) said what is wrong
            return list(said.messages)
        return [f"{getattr(e, 'full_key', None) or 'config'}: cannot be resolved ({str(e).splitlines()[0]})"]
    return []


def _user_error(e: BaseException) -> UserError | None:
    """The UserError a resolver raised, found in the chain of errors OmegaConf wraps it in."""
    seen: BaseException | None = e
    for _ in range(10):
        seen = seen.__cause__ or seen.__context__ if seen is not None else None
        if isinstance(seen, UserError):
            return seen
    return None


def _check_component(cfg: DictConfig, path: str, c: Component) -> list[str]:
    node = OmegaConf.select(cfg, path)
    if not isinstance(node, DictConfig) or "name" not in node:
        return [f"{path}: needs a 'name' key naming a registered {c.registry.kind}"]
    name = str(node.name)
    if name not in c.registry:
        return [f"{path}.name={name}: unknown {c.registry.kind}{did_you_mean(name, c.registry.names())}"]
    factory = c.registry.get(name)
    missing = missing_package(factory, f"{path}={name}")
    if missing:
        return [missing]
    params = list(inspect.signature(factory).parameters.values())[c.runner_args :]
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return []
    accepted = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    errors = []
    for key in node:
        if key in c.runner_keys:
            continue
        if key not in accepted:
            errors.append(
                f"{path}.{key}: not an argument of {c.registry.kind} '{name}'{did_you_mean(str(key), accepted)}"
            )
        else:
            problem = _annotation_problem(accepted[key].annotation, node[key])
            if problem:
                errors.append(f"{path}.{key}={node[key]}: {problem}")
    for p in accepted.values():
        if p.default is p.empty and p.name not in node:
            errors.append(f"{path}.{p.name}: required by {c.registry.kind} '{name}' (set +{path}.{p.name}=...)")
    return errors


def _annotation_problem(annotation: Any, value: Any) -> str | None:
    """Check simple annotations (int, float, bool, str, optionally '| None'); others are trusted."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    parts = {p.strip() for p in str(text).split("|")}
    if value is None:
        return None if "None" in parts else "must not be null"
    base = parts - {"None"}
    if len(base) != 1:
        return None
    sample = {"int": 0, "float": 0.0, "bool": False, "str": ""}.get(base.pop())
    return None if sample is None else type_problem(sample, value)


def _check_values(cfg: DictConfig) -> list[str]:
    errors = []
    for key in dotted_keys(cfg):
        value = OmegaConf.select(cfg, key)
        if isinstance(value, float) and not math.isfinite(value):
            errors.append(f"{key}={value}: must be a finite number")
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT64_MAX:
            errors.append(f"{key}={value}: too large (must fit in 64 bits)")  # torch and numpy take int64 at most
    if not DEVICE.match(str(cfg.get("device", "auto"))):
        errors.append(f"device={cfg.device}: expected auto, cpu, cuda, cuda:N or mps")
    checks = [
        ("trainer.epochs", 0),
        ("data.batch_size", 1),
        ("data.eval_batch_size", 1),
        ("data.num_workers", 0),
        ("data.channels", 1),
        ("data.num_classes", 1),
        ("data.image_size", 1),
        ("trainer.log_every_steps", 1),
        ("trainer.accumulate_grad_batches", 1),
        ("trainer.checkpoint_every_steps", 0),
        ("sched.warmup_epochs", 0),
    ]
    for key, low in checks:
        value = OmegaConf.select(cfg, key)
        if is_number(value) and value < low:
            errors.append(f"{key}={value}: must be >= {low}")
    clip = OmegaConf.select(cfg, "trainer.grad_clip")
    if is_number(clip) and not clip > 0:
        # a negative max norm would flip the gradients' sign, not clip them
        errors.append(f"trainer.grad_clip={clip}: must be > 0 (or null for no clipping)")
    runs_dir = cfg.get("runs_dir", "runs")
    if not isinstance(runs_dir, str):
        errors.append(
            f"runs_dir={'null' if runs_dir is None else runs_dir}: expects the path of a folder (e.g. runs_dir=runs)"
        )
    elif not runs_dir.strip():
        errors.append("runs_dir: must not be empty (e.g. runs_dir=runs)")
    elif Path(runs_dir).expanduser().is_file():
        errors.append(f"runs_dir={runs_dir}: is a file, not a folder")
    name = cfg.get("name")
    if isinstance(name, str) and len(name.encode()) > MAX_NAME:  # the folder <timestamp>_<name> must fit the disk's
        errors.append(f"name: {len(name)} characters; a run's name may have at most {MAX_NAME} (it names its folder)")
    lr = OmegaConf.select(cfg, "optim.lr")
    if isinstance(lr, (int, float)) and math.isfinite(lr) and not lr > 0:
        errors.append(f"optim.lr={lr}: must be > 0")
    fractions = [OmegaConf.select(cfg, f"data.{k}_fraction") for k in ("val", "test")]
    if all(isinstance(f, (int, float)) for f in fractions):
        val, test = fractions
        if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
            errors.append(
                f"data.val_fraction={val} and data.test_fraction={test} must be in [0, 1) and sum to less than 1"
            )
    for key in ("data.path", "data.root"):
        value = OmegaConf.select(cfg, key)
        if isinstance(value, str) and not Path(value).expanduser().exists():
            errors.append(f"{key}={value}: no such file or directory")
    return errors


def _missing_keys(cfg: DictConfig, prefix: str = "") -> Iterator[str]:
    for key in cfg:
        path = f"{prefix}{key}"
        if OmegaConf.is_interpolation(cfg, key):
            continue  # the value it points to is reported where it lives
        if OmegaConf.is_missing(cfg, key):
            yield path
        elif isinstance(cfg[key], DictConfig):
            yield from _missing_keys(cfg[key], path + ".")


def dotted_keys(cfg: DictConfig, prefix: str = "") -> Iterator[str]:
    """Every key path of a config, leaves and inner nodes ("trainer", "trainer.epochs", ...)."""
    for key in cfg:
        path = f"{prefix}{key}"
        yield path
        if not OmegaConf.is_missing(cfg, key) and isinstance(cfg._get_node(key), DictConfig):
            yield from dotted_keys(cfg[key], path + ".")


def _under_free_node(key: str, reference: DictConfig) -> bool:
    """Keys below a node whose reference value is an empty mapping (free-form, e.g. user extras)."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        node = OmegaConf.select(reference, ".".join(parts[:i]))
        if isinstance(node, DictConfig) and len(node) == 0:
            return True
    return False
