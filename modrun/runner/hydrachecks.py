"""What Hydra would do beyond modrun's contract, refused before it happens: run code named in a config, change
directory, or place files outside the run folder (hydra.output_subdir, run.dir, sweep.dir/subdir, log files)."""

from __future__ import annotations

import re
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from modrun.core.errors import UnsafeInput

# the folders modrun chooses itself (runs_dir/<command>/<timestamp>_<name>, a sweep's job folders)
PLACED_BY_MODRUN = ("hydra.run", "hydra.run.dir", "hydra.sweep", "hydra.sweep.dir", "hydra.sweep.subdir", "hydra.mode")
LOGGING = ("hydra.job_logging", "hydra.hydra_logging")
# a log file's path, as Hydra's own job_logging=default writes it: inside the job's output folder
LOGGING_CLASS = re.compile(r"^logging\.(handlers\.)?[A-Z]\w*$")  # logging.FileHandler, logging.handlers.X
JOB_NAME = ("${hydra.job.name}", "${hydra:job.name}")
OUTPUT_DIR = ("${hydra.runtime.output_dir}/", "${hydra:runtime.output_dir}/")


def check_placement_overrides(keys: list[str]) -> None:
    """Overrides (their keys) that would choose where the run folder goes: modrun chooses it."""
    for key in keys:
        if key in PLACED_BY_MODRUN:
            if key == "hydra.mode":
                raise UnsafeInput("hydra.mode: modrun chooses it (`modrun sweep COMMAND ...` runs a multirun)")
            raise UnsafeInput(f"{key}: modrun places the run folder itself (set runs_dir=... and name=... instead)")


def check_hydra_node(cfg: DictConfig) -> None:
    """The composed `hydra` node: no callbacks, no chdir, .hydra/ and log files inside the run folder."""
    if _select(cfg, "hydra.callbacks"):
        raise UnsafeInput("hydra.callbacks: modrun runs no code named in a config (callbacks are _target_ classes)")
    if _select(cfg, "hydra.job.chdir"):
        raise UnsafeInput("hydra.job.chdir=true: a modrun run never changes directory; it writes into its run folder")
    subdir = _select(cfg, "hydra.output_subdir")
    if subdir is not None and not _relative_inside(subdir):
        raise UnsafeInput(
            f"hydra.output_subdir={subdir}: Hydra's record must be a folder inside the run folder (e.g. .hydra)"
        )
    for node in LOGGING:
        value = OmegaConf.select(cfg, node, default=None, throw_on_missing=False)
        if isinstance(value, (DictConfig, ListConfig)):
            _check_logging(value, node)


def _select(cfg: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
    except OmegaConfBaseException as e:
        raise UnsafeInput(f"{key}: cannot be resolved ({str(e).splitlines()[0]})") from None


def _relative_inside(path: Any) -> bool:
    """A relative path below the folder itself: no '..', not absolute (POSIX or Windows), not '.' or ''."""
    if not isinstance(path, str) or not path.strip() or "\x00" in path:
        return False
    posix, windows = PurePosixPath(path), PureWindowsPath(path)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or path.startswith("~"):
        return False
    parts = [p for p in posix.parts if p not in ("", ".")]
    return bool(parts) and ".." not in parts and "${" not in path


def _check_logging(node: Any, where: str) -> None:
    """Python's logging.config.dictConfig, which Hydra hands this node to, builds any class it names (`()` or
    `class`) and opens any `filename`: only logging's own classes, and files inside the run folder."""
    if isinstance(node, (DictConfig, ListConfig)):
        node = OmegaConf.to_container(node, resolve=False)  # a log file's ${hydra.runtime.output_dir} as written
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, value in items:
        path = f"{where}.{key}"
        if isinstance(value, (dict, list)):
            _check_logging(value, path)
        elif key == "()":
            raise UnsafeInput(f"{path}: modrun runs no code named in a config (a logging factory)")
        elif key == "class" and not LOGGING_CLASS.match(str(value)):
            raise UnsafeInput(f"{path}={value}: only logging's own classes (logging.FileHandler, ...) may be named")
        elif key == "filename" and not _log_file_inside(value):
            raise UnsafeInput(
                f"{path}={value}: a log file must stay inside the run folder (${{hydra.runtime.output_dir}}/NAME.log)"
            )


def _log_file_inside(raw: Any) -> bool:
    text = str(raw)
    for name in JOB_NAME:  # the command's name (train, distill, ...): a plain file name
        text = text.replace(name, "job")
    return any(text.startswith(p) and _relative_inside(text[len(p) :]) for p in OUTPUT_DIR)
