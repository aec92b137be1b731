"""From a command line to a run: compose, validate, reserve the run folder, run the pipeline as a Hydra job."""

from __future__ import annotations

# imports inside functions here defer torch (through the lifecycle): `modrun --help` and validation must not load it
import socket
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from modrun.core.errors import UserError, did_you_mean
from modrun.core.registry import RECIPES
from modrun.core.runfolder import alive, check_writable, discard_run_dir, reserve_run_dir
from modrun.runner.compose import Composer, HydraRunError, hydra_free_copy
from modrun.runner.validate import check_record, compose_and_validate


def composer_for(command: str, config_dir: Path | None) -> Composer:
    if command not in RECIPES:
        raise UserError(f"unknown command '{command}'{did_you_mean(command, RECIPES.names())}")
    return Composer(command, config_dir)


def check(command: str, overrides: list[str], config_dir: Path | None = None) -> str:
    """The resolved config as YAML, after validation (`modrun validate`)."""
    with composer_for(command, config_dir) as composer:
        return OmegaConf.to_yaml(compose_and_validate(composer, overrides)[0], resolve=True)


def show(
    command: str, overrides: list[str], config_dir: Path | None, cfg_type: str, package: str | None, resolve: bool
) -> None:
    """`modrun train --cfg job`: Hydra prints the composed config (validated first)."""
    with composer_for(command, config_dir) as composer:
        _, hydra_overrides = compose_and_validate(composer, overrides)
        composer.show(hydra_overrides, cfg_type, package, resolve)


def launch(command: str, overrides: list[str], config_dir: Path | None = None) -> int:
    """Validate, then run one job into a fresh run folder. Returns the exit code."""
    from modrun.core.runfolder import write_record
    from modrun.runner.lifecycle import execute

    with composer_for(command, config_dir) as composer:
        cfg, hydra_overrides = compose_and_validate(composer, overrides)
        try:
            run_dir = reserve_run_dir(Path(cfg.runs_dir), command, str(cfg.name))
        except OSError as e:
            raise UserError(f"runs_dir={cfg.runs_dir}: cannot create a run folder there ({e.strerror or e})") from None

        def task(job_cfg: DictConfig) -> int:
            plain = hydra_free_copy(job_cfg)  # ${hydra:...} resolves only while Hydra runs the job
            write_record(run_dir, plain, command, overrides)
            return execute(command, plain, run_dir, config_dir=config_dir)

        try:
            return composer.run(hydra_overrides, run_dir, task)
        except HydraRunError:
            discard_run_dir(run_dir)  # Hydra failed before the job started: nothing ran, nothing is left
            raise
        except OSError as e:
            # the pipeline's own errors end inside execute(); one that gets here came while the record was
            # written (Hydra's .hydra/, config.yaml, status.json: a full disk), before any work
            discard_run_dir(run_dir)
            raise UserError(f"cannot write the run folder {run_dir}: {e.strerror or e}") from None


def resume_run(run_dir: Path, imports: list[str] | None = None) -> int:
    """Continue a run in its own folder from checkpoints/last.pt (a sweep folder: modrun.runner.sweepresume.resume)."""
    from modrun.core import runlock
    from modrun.core.artifacts import load_run_config
    from modrun.runner.lifecycle import execute

    cfg, status = load_run_config(run_dir)
    if status.get("state") == "running" and status.get("host") == socket.gethostname() and alive(status.get("pid")):
        raise UserError(f"{run_dir} is still running (pid {status['pid']}); stop it before resuming")
    with runlock.hold(Path(run_dir)):  # held from this check to the end: a second resume gets RunBusy (exit 2)
        cfg, status = load_run_config(run_dir)  # as the last process that held the lock left it
        if status.get("state") == "completed":
            print(f"{run_dir} already completed; nothing to resume")
            return 0
        command = status.get("command")
        if command not in RECIPES:
            raise UserError(f"{run_dir}: status.json names no known command ({command!r})")
        check_record(command, cfg, Path(run_dir), list(imports or []))  # a record is input: checked before it runs
        check_writable(Path(run_dir))  # a read-only folder: one line now, not a traceback once the run started
        return execute(command, cfg, Path(run_dir), resume=True)
