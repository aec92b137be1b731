"""What every pipeline does around its own work: devices, building components, the run's lifecycle."""

from __future__ import annotations

import errno
import importlib
import inspect
import logging
import shlex
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from modrun import cost, distributed
from modrun.data import RUNNER_KEYS
from modrun.data.base import Data
from modrun.data.loader import load_in_memory
from modrun.errors import UserError
from modrun.registry import DATASETS, MODELS, import_user_modules
from modrun.runs import (
    atomic_write,
    discard_run_dir,
    log_to,
    read_json,
    record_environment,
    set_status,
    write_json,
)
from modrun.stopping import Interrupted, NonFiniteLoss

log = logging.getLogger("modrun")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name}: CUDA is not available on this machine — did you mean device=cpu?")
    return device


def component_args(node: DictConfig, skip: set[str] = frozenset({"name"})) -> dict[str, Any]:
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in skip}


def builder_args(builder: Callable, node: DictConfig, runner_keys: set[str]) -> dict[str, Any]:
    """The node's keys meant for `builder`: its own keys plus runner keys that its signature names."""
    accepted = inspect.signature(builder).parameters
    return {k: v for k, v in component_args(node).items() if k not in runner_keys or k in accepted}


def build_data(cfg: DictConfig) -> Data:
    builder = DATASETS.get(cfg.data.name)
    data = builder(**builder_args(builder, cfg.data, RUNNER_KEYS))
    # file-backed splits that fit the budget are decoded once and then batched by index, like digits
    data = load_in_memory(data, float(cfg.data.get("in_memory_mb", 1024)), int(cfg.data.get("num_workers", 0)))
    for key in ("channels", "num_classes", "image_size"):
        want = cfg.data.get(key)
        if want is not None and int(want) != getattr(data, key):
            raise UserError(
                f"data.{key}={want} but dataset '{cfg.data.name}' has {getattr(data, key)}; "
                f"set data.{key}={getattr(data, key)}"
            )
    return data


def build_model(node: DictConfig, data: Data | None = None, path: str = "model") -> nn.Module:
    """The registered model of `node`; with `data`, first check that it takes that data's shape."""
    if data is not None:
        for key, have in (
            ("in_channels", data.channels),
            ("num_classes", data.num_classes),
            ("image_size", data.image_size),
        ):
            want = node.get(key)
            if want is not None and int(want) != have:
                raise UserError(f"{path}.{key}={want} does not fit the data, which has {key.split('_')[-1]}={have}")
    return MODELS.get(node.name)(**component_args(node))


def cost_report(model: nn.Module, data: Data, device: torch.device) -> dict[str, Any]:
    example = torch.zeros(1, data.channels, data.image_size, data.image_size, device=device)
    return {
        **cost.count_params(model),
        "macs": cost.count_macs(model, example),
        "latency_ms_batch1": cost.latency_ms(model, example),
        "latency_device": str(device),
    }


def save_weights(run_dir: Path, model: nn.Module) -> None:
    from safetensors.torch import save

    if not distributed.is_main():  # data-parallel: every process holds the same weights; rank 0 writes
        return
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(run_dir / "model.safetensors", save(tensors))


def write_record(
    run_dir: Path, cfg: DictConfig, command: str, overrides: list[str], argv: list[str] | None = None
) -> None:
    """The files that let anyone see and re-run what was asked: config, overrides, command line, env, git.

    `argv` is the command line that re-runs this one job (a sweep's job: `modrun distill <its overrides>`)."""
    atomic_write(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    atomic_write(run_dir / "overrides.txt", "".join(o + "\n" for o in overrides))
    atomic_write(run_dir / "command.txt", shlex.join(["modrun", *(argv if argv is not None else sys.argv[1:])]) + "\n")
    record_environment(run_dir)
    set_status(run_dir, "created", command=command)


def execute(command: str, cfg: DictConfig, run_dir: Path, resume: bool = False) -> int:
    """Run the pipeline of `command` in `run_dir`; record how it ended in status.json. Returns the exit code."""
    pipeline = pipeline_for(command)
    t0 = time.time()
    earlier = float(read_json(run_dir / "status.json").get("active_s", 0.0)) if resume else 0.0

    def ended(state: str, **fields: Any) -> bool:  # every session's time counts, resumed ones too
        try:
            set_status(run_dir, state, active_s=round(earlier + time.time() - t0, 3), **fields)
            return True
        except OSError:  # a full disk: the error being reported matters more than status.json
            return False

    with log_to(run_dir):
        set_status(run_dir, "running", command=command)
        log.info(f"{'resuming' if resume else 'starting'} {command} run in {run_dir}")
        try:
            import_user_modules(list(cfg.get("imports") or []))
            if distributed.processes(cfg) > 1 and not distributed.in_worker():
                summary = distributed.launch(command, cfg, run_dir, resume)  # workers run the pipeline
            else:
                summary = pipeline(cfg, run_dir, resume)
            summary["wall_time_s"] = round(earlier + time.time() - t0, 3)  # all sessions of the run
            write_json(run_dir / "summary.json", summary)
        except UserError:
            # bad input found late (e.g. a file vanished): leave no half-made folder if nothing was trained
            if not (run_dir / "checkpoints" / "last.pt").exists() and not resume:
                discard_run_dir(run_dir)
            else:
                ended("failed", error="bad input")
            raise
        except (Interrupted, KeyboardInterrupt) as e:
            ended("interrupted", error=str(e) or "KeyboardInterrupt")
            log.info(f"interrupted: resume with `modrun resume {run_dir}`")
            return 130
        except NonFiniteLoss as e:
            ended("failed", error=str(e))
            log.error(f"failed: {e}")
            return 1
        except OSError as e:
            if e.errno not in DISK_FULL:
                return _crashed(e, ended)
            # one line, no traceback: atomic writes left every earlier file (and checkpoint) as it was
            recorded = ended("failed", error=f"{e.strerror}: {e.filename or run_dir}")
            log.error(
                f"failed: {e.strerror} while writing into {run_dir}"
                f"{'' if recorded else ' (status.json not updated)'}; the last checkpoint is intact: "
                f"free some space, then `modrun resume {run_dir}`"
            )
            return 1
        except Exception as e:
            return _crashed(e, ended)
        if not ended("completed"):
            log.error(f"failed: status.json of {run_dir} could not be written; `modrun resume {run_dir}` finishes it")
            return 1
        log.info(f"completed: {run_dir}")
    return 0


DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def _crashed(e: Exception, ended: Callable[..., bool]) -> int:
    ended("failed", error=f"{type(e).__name__}: {e}")
    log.error("failed with an exception:\n" + traceback.format_exc())
    return 1


def pipeline_for(command: str) -> Callable[[DictConfig, Path, bool], dict]:
    """The pipeline function of a command, from the fixed table in modrun.pipelines."""
    from modrun.pipelines import PIPELINES

    module, attr = PIPELINES[command].split(":")
    return getattr(importlib.import_module(module), attr)


def load_run_config(run_dir: Path) -> tuple[DictConfig, dict]:
    """config.yaml and status.json of an existing run folder, or a clear error."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "status.json").is_file():
        raise UserError(f"'{run_dir}' is not a modrun run folder (no config.yaml/status.json)")
    try:
        cfg, status = OmegaConf.load(run_dir / "config.yaml"), read_json(run_dir / "status.json")
    except Exception as e:  # noqa: BLE001 - a damaged record (YAML/JSON errors, unreadable files) is bad input
        raise UserError(f"'{run_dir}': cannot read config.yaml/status.json ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, DictConfig) or not isinstance(status, dict):
        raise UserError(f"'{run_dir}': config.yaml or status.json does not hold a mapping")
    return cfg, status
