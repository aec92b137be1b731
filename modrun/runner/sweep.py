"""`modrun sweep COMMAND OVERRIDES`: a Hydra multirun of one pipeline into one sweep folder.

Hydra's sweeper expands the overrides (basic grid, optuna, ...) and its launcher starts the jobs (in this
process, joblib workers, submitit/SLURM). Each job calls `SweepJob` with its composed config; the job runs
the ordinary pipeline into its own run folder inside the sweep folder and records how it ended in
sweep.json and summary.csv. A job that fails is recorded and the others go on.
"""

from __future__ import annotations

# imports inside functions here defer torch and Hydra's sweeper internals: the CLI imports this module for `--help`
import math
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from modrun.core.errors import UserError
from modrun.core.runfolder import read_json, reserve_run_dir
from modrun.core.stopping import sigterm_interrupts
from modrun.core.summary import objective_value
from modrun.runner.compose import hydra_free_copy, job_dir_name
from modrun.runner.objective import check_objective, sweep_objective
from modrun.runner.sweepdir import job_folder, job_state, now, update_job, update_sweep, write_sweep

# Hydra plugins behind the launcher/sweeper choices users type, and the modrun extra that installs each
PLUGINS = {
    "hydra/launcher=joblib": ("hydra_plugins.hydra_joblib_launcher", "sweep"),
    "hydra/sweeper=optuna": ("hydra_plugins.hydra_optuna_sweeper", "sweep"),
    "hydra/launcher=submitit_local": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    "hydra/launcher=submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    "hydra/launcher=slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
}


def check_plugins(overrides: list[str]) -> None:
    """A launcher or sweeper whose plugin is not installed: say which extra installs it."""
    from importlib.util import find_spec

    for line in overrides:
        module, extra = PLUGINS.get(line.replace(" ", ""), (None, None))
        if module and find_spec(module) is None:
            raise UserError(f"{line} needs a Hydra plugin that is not installed: pip install 'modrun[{extra}]'")


def run_sweep(command: str, overrides: list[str], config_dir: Path | None = None) -> int:
    """Validate every swept value, reserve the sweep folder, hand the jobs to Hydra. Returns the exit code."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    from modrun.runner.launch import composer_for
    from modrun.runner.validate import validate_sweep

    check_plugins(overrides)
    with composer_for(command, config_dir) as composer:
        first_cfg, lines = validate_sweep(composer, overrides)
        hydra_cfg = composer.compose(lines, with_hydra=True, sweep=True).hydra
        objective, direction = sweep_objective(first_cfg)
        if direction not in ("maximize", "minimize"):
            raise UserError(f"sweep.direction={direction}: must be maximize or minimize")
        check_objective(command, first_cfg, objective)
        sweeper = str(hydra_cfg.sweeper._target_).rsplit(".", 1)[-1]
        launcher = str(hydra_cfg.launcher._target_).rsplit(".", 1)[-1]
        optimizing = sweeper != "BasicSweeper"  # optuna and the like read each job's return value
        if sweeper == "OptunaSweeper" and not any(line.startswith("hydra.sweeper.direction=") for line in lines):
            lines.append(f"hydra.sweeper.direction={direction}")  # optuna optimises the sweep's own objective
        jobs = []
        if sweeper == "BasicSweeper":  # the grid is known before it runs: list every job as pending
            _no_intervals(composer, lines)
            task_lines = [line for line in lines if not _is_hydra_line(line)]
            grid = BasicSweeper.split_arguments(composer.parse(task_lines), None)[0]
            jobs = [
                {"num": i, "run_dir": job_dir_name(i), "overrides": o, "state": "pending"} for i, o in enumerate(grid)
            ]
        sweep_dir = reserve_run_dir(Path(first_cfg.runs_dir), "sweeps", f"{command}_{first_cfg.name}")
        record = {
            "command": command,
            "argv": ["modrun", *sys.argv[1:]],
            "overrides": overrides,
            "hydra_overrides": lines,
            "sweeper": sweeper,
            "launcher": launcher,
            "objective": objective,
            "direction": direction,
            "config_dir": str(Path(config_dir).resolve()) if config_dir else None,  # what `modrun resume` composes
            "state": "running",
            "created": now(),
            "jobs": jobs,
        }
        write_sweep(sweep_dir, record)
        say(f"sweep {sweep_dir}: {len(jobs) or 'up to ' + str(hydra_cfg.sweeper.get('n_trials', '?'))} jobs")
        threads = _threads_per_job(hydra_cfg, len(jobs))
        task = SweepJob(command, sweep_dir, objective, direction, optimizing, threads, record["config_dir"])
        try:
            with sigterm_interrupts():  # SIGTERM between jobs too: the sweep is interrupted, as by Ctrl-C
                composer.multirun(lines, sweep_dir.absolute(), task)
        except KeyboardInterrupt:
            return interrupted(sweep_dir, objective)
    return finish(sweep_dir)


def interrupted(sweep_dir: Path, objective: str) -> int:
    """Mark the sweep interrupted (exit 130). A signal can land between a job's end and its line in sweep.json:
    a job still `running` there takes the state (and objective) its own folder records."""
    for job in read_json(sweep_dir / "sweep.json")["jobs"]:
        state = readable_job_state(sweep_dir, job) if job.get("state") == "running" else None
        if state is not None and state != "running":
            folder = job_folder(sweep_dir, job)
            summary = folder / "summary.json" if folder else None
            value = objective_value(read_json(summary), objective) if summary and summary.is_file() else None
            update_job(sweep_dir, job["num"], state=state, objective=value)
    update_sweep(sweep_dir, state="interrupted")
    say(f"sweep interrupted: continue it with `modrun resume {sweep_dir}`")
    return 130


def _no_intervals(composer: Any, lines: list[str]) -> None:
    """interval() is a range to sample from: only a sampling sweeper (optuna) can use it, not the grid."""
    for o in composer.parse(lines):
        if o.is_interval_sweep():
            raise UserError(
                f"{o.input_line}: interval() needs a sweeper that samples: add hydra/sweeper=optuna "
                "(pip install 'modrun[sweep]'), or list the values (a=1,2,3) or use range()"
            )


def finish(sweep_dir: Path) -> int:
    """Mark the sweep completed or failed from its jobs, print the ranked table; 1 when any job failed."""
    from modrun.runner.compare import compare

    data = read_json(sweep_dir / "sweep.json")
    states = [readable_job_state(sweep_dir, j) for j in data["jobs"]]
    failed = [j["num"] for j, s in zip(data["jobs"], states, strict=True) if s != "completed"]
    update_sweep(sweep_dir, state="failed" if failed else "completed", ended=now())
    compare([sweep_dir], plots=False)
    if failed:
        say(f"{len(failed)} of {len(states)} jobs did not complete ({failed}); `modrun resume {sweep_dir}` reruns them")
        return 1
    say(f"sweep completed: {sweep_dir}")
    return 0


class SweepJob:
    """One job of a sweep, called by the launcher (maybe in another process) with the job's composed config."""

    def __init__(
        self,
        command: str,
        sweep_dir: Path,
        objective: str,
        direction: str,
        optimizing: bool,
        threads: int = 0,
        config_dir: str | None = None,
    ) -> None:
        self.command, self.sweep_dir, self.config_dir = command, Path(sweep_dir).absolute(), config_dir
        self.objective, self.direction, self.optimizing, self.threads = objective, direction, optimizing, threads
        self.cwd = os.getcwd()  # relative paths of the job (data.path, teacher.run) mean what they meant here

    def __call__(self, job_cfg: DictConfig) -> float | int:
        from hydra.core.hydra_config import HydraConfig

        if os.getcwd() != self.cwd and os.path.isdir(self.cwd):  # a pool's worker kept from an earlier sweep
            os.chdir(self.cwd)
        hc = HydraConfig.get()
        num, run_dir, overrides = int(hc.job.num), Path(hc.runtime.output_dir), list(hc.overrides.task)
        say(f"job {job_dir_name(num)}: {shlex.join(overrides)}")
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        update_job(self.sweep_dir, num, run_dir=run_dir.name, overrides=overrides, state="running", started=now())
        code = run_job(self.command, hydra_free_copy(job_cfg), run_dir, overrides, self.config_dir)
        value = self.record_end(num, run_dir, code)
        if code == 130:
            raise KeyboardInterrupt  # Ctrl-C stops the whole sweep, as it would a single run
        if not self.optimizing:
            return code
        # a sweeper that optimises needs a number: a failed job counts as the worst possible result
        worst = -math.inf if self.direction == "maximize" else math.inf
        return worst if value is None else value

    def record_end(self, num: int, run_dir: Path, code: int, error: str | None = None) -> float | None:
        state = readable_job_state(self.sweep_dir, {"run_dir": run_dir.name, "state": "failed"})
        summary_path = run_dir / "summary.json"
        value = objective_value(read_json(summary_path), self.objective) if summary_path.exists() else None
        reason = {"error": error} if error else {}
        update_job(self.sweep_dir, num, state=state, exit_code=code, objective=value, ended=now(), **reason)
        return value


def run_job(command: str, cfg: DictConfig, run_dir: Path, overrides: list[str], config_dir: str | None = None) -> int:
    """The pipeline of one job into `run_dir`; never raises for the job's own failures (they are recorded)."""
    from modrun.core.runfolder import write_record
    from modrun.runner.lifecycle import execute

    try:
        write_record(run_dir, cfg, command, overrides, argv=[command, *overrides])
        return execute(command, cfg, run_dir, config_dir=config_dir)
    except UserError as e:  # bad input found late, e.g. a file one job names is missing
        say(f"job {run_dir.name}: error: {'; '.join(e.messages)}")
        return 2
    except KeyboardInterrupt:
        return 130


def _threads_per_job(hydra_cfg: DictConfig, n_jobs: int) -> int:
    """CPU threads per job when a launcher runs jobs side by side on this machine (0: leave torch's default).

    Two jobs each spinning as many threads as there are cores slow each other down by orders of magnitude;
    joblib's workers limit themselves, submitit's local processes do not."""
    target = str(hydra_cfg.launcher._target_)
    if not target.endswith("LocalLauncher") or "submitit" not in target:
        return 0
    parallel = min(
        n_jobs or int(hydra_cfg.sweeper.get("n_jobs", 1)), int(hydra_cfg.launcher.get("array_parallelism", 1))
    )
    return max(1, (os.cpu_count() or 1) // max(1, parallel))


def _is_hydra_line(line: str) -> bool:
    key = line.lstrip("~+").split("=", 1)[0]
    return key.startswith("hydra.") or key.startswith("hydra/")


def say(message: str) -> None:
    print(f"[sweep] {message}", file=sys.stderr, flush=True)


def readable_job_state(sweep_dir: Path, job: dict) -> str:
    try:
        return job_state(sweep_dir, job)
    except (OSError, ValueError, AttributeError):  # a damaged status.json: the job is rerun (and said bad)
        return "unreadable"
