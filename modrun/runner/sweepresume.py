"""`modrun resume SWEEP`: the jobs of a sweep that did not complete, rerun in this process and in order.

A job's folder and overrides come from sweep.json, a record: its folder must lie inside the sweep, its
overrides may import only the modules the user names, and a job that cannot run is recorded failed with its
reason while the next one goes on.
"""

from __future__ import annotations

# imports inside functions here defer torch (through the launch module): the CLI imports this module early
import shlex
from pathlib import Path

from omegaconf import DictConfig

from modrun.core.errors import UserError
from modrun.core.records import RecordError, inside
from modrun.core.registry import RECIPES
from modrun.core.runfolder import read_json
from modrun.core.stopping import sigterm_interrupts
from modrun.runner.compose import hydra_free_copy
from modrun.runner.sweep import SweepJob, finish, interrupted, readable_job_state, run_job, say
from modrun.runner.sweepdir import now, update_job, update_sweep


def resume_sweep(sweep_dir: Path, imports: list[str] | None = None) -> int:
    """Rerun, in this process and in order, the jobs of a sweep that did not complete; then rank them all.

    A job that cannot be resumed (bad input: an unknown model, no usable checkpoint, a damaged record) is
    recorded as failed with its reason and the next one goes on, as in a live sweep."""
    record = Path(sweep_dir) / "sweep.json"
    try:
        data = read_json(record)
        task = SweepJob(data["command"], sweep_dir, data["objective"], data["direction"], optimizing=False)
        if not all(isinstance(j, dict) and {"num", "run_dir", "overrides"} <= set(j) for j in data["jobs"]):
            raise ValueError("a job without num, run_dir or overrides")
        if not all(
            isinstance(j["overrides"], list) and all(isinstance(o, str) for o in j["overrides"]) for j in data["jobs"]
        ):
            raise ValueError("a job whose overrides are not a list of strings")
        if data["command"] not in RECIPES:
            raise ValueError(f"no such command {data['command']!r}")
    except RecordError:
        raise
    except (OSError, ValueError, TypeError, KeyError) as e:  # a damaged record is bad input, not a crash
        raise UserError(f"{record} cannot be read as a sweep record ({type(e).__name__}: {e})") from None
    for job in data["jobs"]:  # a job's folder is inside the sweep folder, whatever sweep.json says
        inside(sweep_dir, job["run_dir"], record)
    config_dir = data.get("config_dir")  # the user's --config-dir, recorded absolute when the sweep started
    todo = [j for j in data["jobs"] if readable_job_state(sweep_dir, j) != "completed"]
    if not todo and data["jobs"]:
        say(f"{sweep_dir}: every job already completed")
    update_sweep(sweep_dir, state="running")
    try:
        with sigterm_interrupts():  # SIGTERM between jobs too: interrupted, resumable again
            for job in todo:
                run_dir = sweep_dir / job["run_dir"]
                say(f"job {job['run_dir']}: {shlex.join(job['overrides'])}")
                update_job(sweep_dir, job["num"], state="running", started=now())
                code, reason = _resume_job(data["command"], run_dir, job["overrides"], config_dir, imports, record)
                task.record_end(job["num"], run_dir, code, reason)
                if code == 130:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        return interrupted(sweep_dir, task.objective)
    return finish(sweep_dir)


def _resume_job(
    command: str, run_dir: Path, overrides: list[str], config_dir: str | None, imports: list[str] | None, record: Path
) -> tuple[int, str | None]:
    """Resume (or start) one job; its exit code and, when it could not run, why (never raises for bad input)."""
    from modrun.core.artifacts import load_run_config
    from modrun.core.runlock import RunBusy
    from modrun.runner.launch import composer_for, resume_run

    try:
        if (run_dir / "config.yaml").is_file() and (run_dir / "status.json").is_file():
            load_run_config(run_dir)
            return resume_run(run_dir, imports), None
        _check_job_imports(overrides, imports or [], record)
        run_dir.mkdir(parents=True, exist_ok=True)
        with composer_for(command, Path(config_dir) if config_dir else None) as composer:
            return composer.run(overrides, run_dir, _Fresh(command, run_dir, overrides, config_dir)), None
    except KeyboardInterrupt:
        return 130, None
    except UserError as e:
        reason = "; ".join(e.messages)
        say(f"job {run_dir.name}: error: {reason}")
        if not isinstance(e, RunBusy):  # another process runs it: its status.json is its own
            mark_failed(run_dir, f"bad input: {reason}")
        return 2, reason


def mark_failed(run_dir: Path, error: str) -> None:
    """status.json of a job that could not run says so, even when what was there could not be read."""
    from modrun.core.runfolder import set_status, write_json

    try:
        set_status(run_dir, "failed", error=error)
    except (OSError, ValueError, AttributeError):  # a damaged status.json (not JSON, not a mapping)
        write_json(run_dir / "status.json", {"state": "failed", "error": error, "ended": now()})


def _check_job_imports(overrides: list[str], given: list[str], record: Path) -> None:
    """A job's overrides come from sweep.json: they may import only the modules the user named."""
    from modrun.core.registry import split_imports  # here: only a sweep's resume reads overrides from a record

    modules, _ = split_imports(overrides)
    untrusted = [m for m in modules if m not in given]
    if untrusted:
        raise UserError(
            f"{record}: a job names imports={untrusted}; modrun imports no module a record names "
            f"(if you trust that code: modrun resume SWEEP +imports=[{','.join(modules)}])"
        )


class _Fresh:
    """A job that never started, run now as a Hydra job into its reserved folder."""

    def __init__(self, command: str, run_dir: Path, overrides: list[str], config_dir: str | None = None) -> None:
        self.command, self.run_dir, self.overrides, self.config_dir = command, run_dir, overrides, config_dir

    def __call__(self, job_cfg: DictConfig) -> int:
        return run_job(self.command, hydra_free_copy(job_cfg), self.run_dir, self.overrides, self.config_dir)


def is_sweep_dir(path: Path) -> bool:
    return (Path(path) / "sweep.json").is_file()


def resume(path: Path, imports: list[str] | None = None) -> int:
    """`modrun resume PATH [+imports=[...]]`: a sweep folder's unfinished jobs, or one run folder."""
    from modrun.runner.launch import resume_run

    given = list(imports or [])
    return resume_sweep(Path(path), given) if is_sweep_dir(path) else resume_run(Path(path), given)
