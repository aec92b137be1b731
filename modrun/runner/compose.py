"""The only module that talks to Hydra: compose configs, run a job, run a multirun, print `--cfg`.

Every argument after a command is a Hydra override, parsed and applied by Hydra itself, so the whole
override grammar (and later launchers and sweepers) comes from Hydra rather than a parser of ours.
"""

from __future__ import annotations

# imports inside functions here defer Hydra's internals: loaded once a command composes a config
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from modrun.components.data.tokenize import vocab_size
from modrun.core.errors import UnsafeInput, UserError
from modrun.runner.hydrachecks import check_hydra_node, check_placement_overrides

CONFIG_MODULE = "pkg://modrun.conf"
# what composing a config tree raises for bad input: Hydra's errors, broken YAML in a --config-dir, OmegaConf's
COMPOSE_ERRORS = (HydraException, ValueError, KeyError, yaml.YAMLError, OmegaConfBaseException)


def search_path(config_dir: str | Path | None) -> Any:
    """The packaged config tree, with the user's own (`--config-dir`) searched first so that its files overlay ours."""
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery

    path = create_config_search_path(CONFIG_MODULE)
    if config_dir is not None:
        folder = os.path.abspath(config_dir)
        if not os.path.isdir(folder):
            raise UserError(f"--config-dir: '{config_dir}' is not a directory")
        path.prepend(provider="command-line", path=f"file://{folder}", anchor=SearchPathQuery(provider="main"))
    return path


def compose_plain(command: str, overrides: list[str], config_dir: str | Path | None = None) -> DictConfig:
    """A command's config composed with `overrides`, without Hydra's node and without touching Hydra's global
    state (so it works inside a running Hydra job, e.g. for a run that another run needs first)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    loader = ConfigLoaderImpl(config_search_path=search_path(config_dir))
    try:
        cfg = loader.load_configuration(config_name=command, overrides=list(overrides), run_mode=RunMode.RUN)
    except COMPOSE_ERRORS as e:
        raise UserError(_first_line(e)) from None
    check_hydra_node(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


class HydraRunError(UserError):
    """Hydra failed to start a job whose config had composed (e.g. a logging handler it cannot build)."""


class Composer:
    """A Hydra instance for one command's primary config (`train.yaml`, ...), with the user's tree on top."""

    def __init__(self, command: str, config_dir: str | Path | None = None) -> None:
        from hydra._internal.hydra import Hydra

        self.command, self.config_dir = command, config_dir
        GlobalHydra.instance().clear()
        self.hydra = Hydra.create_main_hydra2(task_name=command, config_search_path=search_path(config_dir))

    def __enter__(self) -> Composer:
        return self

    def __exit__(self, *exc: Any) -> None:
        GlobalHydra.instance().clear()

    def groups(self) -> list[str]:
        """Config groups of the tree (model, data, ...), nested ones with slashes; Hydra's own left out."""
        from hydra.core.object_type import ObjectType

        # the loader's repository itself: loader.list_groups() deep-copies it on every call (~10 ms each)
        repository = self.hydra.config_loader.repository

        def walk(parent: str) -> list[str]:
            found = []
            for name in repository.get_group_options(parent, ObjectType.GROUP):
                group = f"{parent}/{name}" if parent else name
                if group != "hydra":
                    found += [group, *walk(group)]
            return found

        return walk("")

    def options(self, group: str) -> list[str]:
        return self.hydra.config_loader.repository.get_group_options(group)  # see groups()

    def parse(self, overrides: list[str]) -> list[Override]:
        try:  # with the config loader, a sweep's glob(...) over a group's options can be expanded
            parsed = OverridesParser.create(config_loader=self.hydra.config_loader).parse_overrides(overrides)
        except OverrideParseException as e:
            raise UserError(f"bad override syntax: {str(e).splitlines()[0]}") from None
        check_placement_overrides([o.key_or_group for o in parsed])
        return parsed

    def compose(self, overrides: list[str], with_hydra: bool = False, sweep: bool = False) -> DictConfig:
        try:
            cfg = self.hydra.compose_config(
                self.command,
                overrides,
                run_mode=RunMode.MULTIRUN if sweep else RunMode.RUN,
                validate_sweep_overrides=not sweep,
            )
        except COMPOSE_ERRORS as e:
            raise UserError(_first_line(e)) from None
        check_hydra_node(cfg)
        mode = OmegaConf.select(cfg, "hydra.mode")
        if not sweep and mode is not None and mode != RunMode.RUN:
            raise UnsafeInput(f"hydra.mode={mode}: one run is one job; `modrun sweep {self.command} ...` runs several")
        if not with_hydra:
            with open_dict(cfg):
                del cfg["hydra"]
        return cfg

    def run(self, overrides: list[str], run_dir: Path, task: Callable[[DictConfig], int]) -> int:
        """Run `task` as one Hydra job whose output folder is `run_dir` (Hydra writes .hydra/ there)."""
        self.parse(overrides)  # also overrides read from a record (a sweep's job): none may place the run folder
        run_override = f"hydra.run.dir={_quote(str(run_dir))}"
        raised: list[BaseException] = []

        def guarded(cfg: DictConfig) -> Any:
            # Hydra would print "Error executing job with overrides: ..." before re-raising a job's exception;
            # bad input found late must stay one `modrun: error:` line, so the exception goes round Hydra
            try:
                return task(cfg)
            except BaseException as e:
                raised.append(e)
                return 1

        try:
            ret = self.hydra.run(self.command, guarded, [*overrides, run_override], with_log_configuration=True)
        except Exception as e:  # noqa: BLE001 - Hydra's own failure before the task ran (logging config, ...)
            if raised:
                raise raised[0] from None
            raise HydraRunError(f"Hydra could not start the job: {_first_line(e)}") from None
        if raised:
            raise raised[0]
        return int(ret.return_value)

    def multirun(self, overrides: list[str], sweep_dir: Path, task: Callable[[DictConfig], Any]) -> Any:
        """Hand `overrides` to Hydra's configured sweeper and launcher; each job's folder is inside `sweep_dir`."""
        self.parse(overrides)
        where = [f"hydra.sweep.dir={_quote(str(sweep_dir))}", "hydra.sweep.subdir='${modrun_job_dir:${hydra.job.num}}'"]
        try:
            return self.hydra.multirun(self.command, task, [*overrides, *where], with_log_configuration=True)
        except HydraException as e:
            raise UserError(_first_line(e)) from None

    def show(self, overrides: list[str], cfg_type: str, package: str | None, resolve: bool) -> None:
        if cfg_type not in ("job", "hydra", "all"):
            raise UserError(f"--cfg must be job, hydra or all, got '{cfg_type}'")
        try:
            self.hydra.show_cfg(self.command, overrides, cfg_type=cfg_type, package=package, resolve=resolve)
        except COMPOSE_ERRORS as e:
            raise UserError(_first_line(e)) from None


def job_dir_name(num: int | str) -> str:
    """A sweep job's folder: zero-padded so that a file browser lists jobs in order."""
    return f"{int(num):03d}"


# resolved by Hydra inside each job, in whatever process the launcher starts: registered on import, and the
# sweep's task lives in modrun.runner.sweep, which imports this module wherever the task is unpickled
OmegaConf.register_new_resolver("modrun_job_dir", job_dir_name, replace=True)
# data.vocab_size of a tokenised text_file: the tokenizer's size, read from its folder (conf/data/text_file.yaml)
OmegaConf.register_new_resolver("modrun_vocab", vocab_size, replace=True)


def _quote(value: str) -> str:
    """Quote a path for Hydra's override grammar (spaces, commas and '=' would otherwise split it)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _first_line(e: Exception) -> str:
    mark = getattr(e, "problem_mark", None)
    if isinstance(e, yaml.YAMLError) and mark is not None:  # broken YAML: say which file and line
        return f"{mark.name}:{mark.line + 1}: invalid YAML ({getattr(e, 'problem', None) or type(e).__name__})"
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def hydra_free_copy(cfg: DictConfig) -> DictConfig:
    """A plain config with every ${hydra:...} interpolation resolved, safe to keep after Hydra is gone."""
    return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
