"""Build a config's models, optimizer and schedule before any work, models on the meta device (no memory, no
time): arguments that the factories themselves refuse (a negative width, dropout 1.5, momentum -1) are bad
input, said in one line with exit 2, not a run that fails after its folder was written."""

from __future__ import annotations

# imports inside functions here defer torch: validation reports a bad config before torch is loaded
import warnings
from typing import Any

from omegaconf import DictConfig, OmegaConf

from modrun.core.errors import UserError

RUNNER_MODEL_KEYS = {
    "name",
    "run",
    "checkpoint",
    "seed",
    "epochs",
    "overrides",
}  # teacher.* keys that are not model arguments


def check_build(cfg: DictConfig) -> list[str]:
    """One line per component of `cfg` that cannot be built with its arguments."""
    import torch

    from modrun.core.registry import OPTIMIZERS, SCHEDULERS

    errors = [m for path, node in _model_nodes(cfg) for m in model_problems(node, path)]
    optim = cfg.get("optim")
    if optim is None or "name" not in optim:
        return errors
    try:  # a real parameter: optimizers check their arguments when they are built
        optimizer = OPTIMIZERS.get(optim.name)([torch.nn.Parameter(torch.zeros(1))], **_args(optim))
    except Exception as e:  # noqa: BLE001 - whatever the factory refuses is bad input
        return [*errors, f"optim: optimizer '{optim.name}' refuses these arguments ({_short(e)})"]
    sched = cfg.get("sched")
    if sched is not None and "name" in sched:
        epochs = OmegaConf.select(cfg, "trainer.epochs", default=1)
        per_epoch = 10  # any plausible length: a schedule's arguments do not depend on it
        try:
            SCHEDULERS.get(sched.name)(optimizer, max(1, int(epochs)) * per_epoch, per_epoch, **_args(sched))
        except Exception as e:  # noqa: BLE001
            errors.append(f"sched: scheduler '{sched.name}' refuses these arguments ({_short(e)})")
    return errors


def build_on_meta(node: DictConfig) -> Any:
    """The registered model of `node`, on the meta device."""
    import torch

    from modrun.components.build import component_args
    from modrun.core.registry import MODELS

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Initializing zero-element tensors is a no-op": reported below instead
        return MODELS.get(node.name)(**component_args(node, RUNNER_MODEL_KEYS))


def model_problems(node: DictConfig, path: str) -> list[str]:
    """Why the model of `node` (at config path `path`) cannot be built, or has layers without weights."""
    try:
        model = build_on_meta(node)
    except NotImplementedError:
        return []  # an operation without a meta kernel: the real build will tell
    except UserError as e:  # the factory said what is wrong in the user's terms
        return list(e.messages)
    except Exception as e:  # noqa: BLE001 - whatever the factory refuses is bad input
        return [f"{path}: model '{node.name}' cannot be built with these arguments ({_short(e)})"]
    empty = [name for name, p in model.named_parameters() if p.numel() == 0]
    if empty:
        return [f"{path}: model '{node.name}' has layers without weights ({empty[0]}): is a width or size 0?"]
    return []


def _model_nodes(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    nodes = [("model", cfg.model)] if isinstance(cfg.get("model"), DictConfig) and "name" in cfg.model else []
    teacher = cfg.get("teacher")
    if isinstance(teacher, DictConfig) and "name" in teacher and not teacher.get("run"):
        nodes.append(("teacher", teacher))  # a teacher from teacher.run is checked with its run folder
    return nodes


def _args(node: DictConfig) -> dict[str, Any]:
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "name"}


def _short(e: Exception) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
