"""A run's lifecycle around its recipe: status.json, log.txt, the runs it needs first, data-parallel workers,
and how it ended (completed, interrupted, failed), with its exit code."""

from __future__ import annotations

import errno
import logging
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from modrun.core import collectives as distributed
from modrun.core import runlock
from modrun.core.errors import UserError
from modrun.core.registry import RECIPES, import_user_modules
from modrun.core.runfolder import (
    discard_run_dir,
    log_to,
    read_json,
    set_status,
    write_json,
)
from modrun.core.stopping import Interrupted, NonFiniteLoss, sigterm_interrupts
from modrun.runner import parallel, prerequisites

log = logging.getLogger("modrun")


def execute(
    command: str, cfg: DictConfig, run_dir: Path, resume: bool = False, config_dir: Path | str | None = None
) -> int:
    """Run the recipe of `command` in `run_dir`; record how it ended in status.json. Returns the exit code.

    `config_dir` (the user's --config-dir) is where the configs of runs this one needs first are composed from."""
    with runlock.hold(run_dir):  # one process trains a run folder at a time (a second gets RunBusy, exit 2)
        return _execute(command, cfg, run_dir, resume, config_dir)


def _execute(command: str, cfg: DictConfig, run_dir: Path, resume: bool, config_dir: Path | str | None) -> int:
    recipe = RECIPES.get(command)
    t0 = time.time()
    active = read_json(run_dir / "status.json").get("active_s", 0.0) if resume else 0.0
    earlier = float(active) if isinstance(active, (int, float)) and not isinstance(active, bool) else 0.0

    def ended(state: str, **fields: Any) -> bool:  # every session's time counts, resumed ones too
        try:
            set_status(run_dir, state, active_s=round(earlier + time.time() - t0, 3), **fields)
            return True
        except OSError:  # a full disk: the error being reported matters more than status.json
            return False

    with sigterm_interrupts(), log_to(run_dir):  # SIGTERM anywhere in the run: interrupted, as Ctrl-C
        set_status(run_dir, "running", command=command)
        log.info(f"{'resuming' if resume else 'starting'} {command} run in {run_dir}")
        if resume:  # a SIGKILL in the middle of an atomic write leaves its temp file; nobody else writes here now
            runlock.remove_stale_temp_files(run_dir)
        try:
            import_user_modules(list(cfg.get("imports") or []))
            # teacher, source: found or trained here, once, before any worker starts (they see the folders)
            cfg = prerequisites.resolve(command, cfg, run_dir, execute, config_dir)
            if distributed.processes(cfg) > 1 and not distributed.in_worker():
                summary = parallel.launch(command, cfg, run_dir, resume)  # workers run the recipe
            else:
                summary = recipe.run(cfg, run_dir, resume)
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
        log.info(f"completed: {result_line(summary)}  {run_dir}")
    return 0


DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def _crashed(e: Exception, ended: Callable[..., bool]) -> int:
    ended("failed", error=f"{type(e).__name__}: {e}")
    log.error("failed with an exception:\n" + traceback.format_exc())
    return 1


def result_line(summary: dict[str, Any]) -> str:
    """The run's result in one line: final val/test top-1 and loss, then the best validation epoch's."""
    final, best = summary.get("final") or {}, summary.get("best") or {}

    def shown(metrics: dict[str, Any]) -> str:
        keys = [
            k for k in metrics if k.split("/")[0] in ("val", "test") and k.split("/")[-1] in ("top1", "loss", "bpb")
        ]
        return " ".join(f"{k} {metrics[k]:.4g}" for k in keys if isinstance(metrics[k], (int, float)))

    line = shown(final)
    if isinstance(best.get("epoch"), int) and best["epoch"] >= 0:
        line += f"  best (epoch {best['epoch']}): {shown(best)}"
    return line
