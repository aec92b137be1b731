"""The run folder: reserve it, write into it atomically, record status, environment and git state."""

from __future__ import annotations

import contextlib

# imports inside functions here defer torch: `modrun runs` and the CLI read run folders without loading torch
import errno
import json
import logging
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from modrun.core import index, records
from modrun.core.environment import env_info, git_info
from modrun.core.errors import UserError, WriteFailed

PREREQUISITES = "prerequisites.json"  # the runs this run needed first (written by modrun.runner.prerequisites)

log = logging.getLogger("modrun")
LOG_FORMAT = "%(asctime)s %(message)s"
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write via a temp file in the same folder + os.replace: a kill leaves the old file or the new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the run folder the user's usual modes
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_line(path: Path, line: str) -> None:
    """Append one line to a small record (evals.jsonl) atomically: the file holds every line or the old ones.

    A folder that cannot be written (read-only, not ours) is bad input; a full disk is a WriteFailed."""
    path = Path(path)
    try:
        old = path.read_bytes() if path.exists() else b""
        if old and not old.endswith(b"\n"):
            old += b"\n"  # a line cut by an earlier kill stays a line of its own
        atomic_write(path, old + line.encode() + b"\n")
    except (PermissionError, IsADirectoryError) as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    except OSError as e:
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR):
            raise UserError(f"cannot write {path}: {e.strerror or e}") from None
        raise WriteFailed(f"cannot write {path}: {e.strerror or e}; it is as it was before") from None


def check_writable(folder: Path) -> None:
    """A run folder that is to be written again (resume): a temp file and log.txt can be made there."""
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".write-check.")
        os.close(fd)
        os.unlink(tmp)
        with open(Path(folder) / "log.txt", "a", encoding="utf-8"):
            pass
    except OSError as e:
        raise UserError(f"cannot write into {folder}: {e.strerror or e} (the run folder must be writable)") from None


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, default=str) + "\n")


def read_json(path: Path, expect: type | tuple[type, ...] = dict) -> Any:
    """A JSON record holding `expect` (an object by default); a damaged one is a RecordError (see core/records)."""
    return records.read_json(path, expect)


def reserve_run_dir(runs_dir: Path, command: str, name: str) -> Path:
    """Create runs/<command>/<timestamp>_<name>; mkdir is the atomic claim, so same-second runs differ."""
    parent = index.root(runs_dir) / command
    made = [p for p in (parent, *parent.parents) if not p.exists()]
    parent.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.now():%Y-%m-%d_%H-%M-%S}_{re.sub(r'[^A-Za-z0-9_.=-]+', '-', name).strip('-') or 'run'}"
    for i in range(1, 10_000):
        path = parent / (stem if i == 1 else f"{stem}_{i}")
        try:
            path.mkdir(parents=True)  # parents again: a failed run beside us may have removed an empty parent
            return path
        except FileExistsError:
            continue
        except OSError:
            for p in made:  # the folders made for this run only (runs/, runs/<command>/), if still empty
                with contextlib.suppress(OSError):
                    p.rmdir()
            raise
    raise RuntimeError(f"cannot reserve a run folder under {parent}")


def discard_run_dir(run_dir: Path) -> None:
    """Remove a run folder in which nothing ran (bad input found late), and runs/<command>/, its index entry
    and runs/ if now empty."""
    shutil.rmtree(run_dir, ignore_errors=True)
    try:
        Path(run_dir).parent.rmdir()  # a run reserving beside us re-creates it (reserve_run_dir: parents=True)
    except OSError:
        return  # not empty: other runs live there
    index.forget_missing(Path(run_dir).parent.parent, Path(run_dir).parent.name)


def set_status(run_dir: Path, state: str, **fields: Any) -> None:
    """Update status.json, keeping earlier fields (start time, command) unless overwritten."""
    path = Path(run_dir) / "status.json"
    status = read_json(path) if path.exists() else {}
    status.update(state=state, pid=os.getpid(), host=socket.gethostname(), updated=_now(), **fields)
    if state == "running":
        status.setdefault("started", _now())
        status.pop("error", None)
        status.pop("ended", None)
    else:
        status["ended"] = _now()
    write_json(path, status)


def record_environment(run_dir: Path) -> None:
    write_json(run_dir / "env.json", env_info())
    git = git_info(Path.cwd())
    if git is not None:
        write_json(run_dir / "git.json", git[0])
        atomic_write(run_dir / "git.diff", git[1])


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


@contextmanager
def log_to(run_dir: Path) -> Iterator[None]:
    """Send modrun's log lines to the console and to log.txt, the same lines in both."""
    formatter = logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S")
    file_handler = logging.FileHandler(run_dir / "log.txt", encoding="utf-8")
    console = _StderrHandler()
    for h in (file_handler, console):
        h.setFormatter(formatter)
    # a run started inside another (a teacher trained for a distillation) logs to its own folder only
    outer = list(log.handlers)
    for h in outer:
        log.removeHandler(h)
    for h in (file_handler, console):
        log.addHandler(h)
    old_level, log.propagate = log.level, False
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        for h in (file_handler, console):
            log.removeHandler(h)
            h.close()
        for h in outer:
            log.addHandler(h)
        log.setLevel(old_level)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time, so lines printed under a live progress bar stay tidy."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass


class MetricsWriter:
    """metrics.jsonl: one JSON object per line, flushed as written so a killed run keeps its record.

    `sinks` (loggers, see modrun.components.loggers) get each record after the file; used as a context manager, the
    writer closes them with how the block ended."""

    def __init__(
        self, path: Path, resume_step: int | None = None, phase: str | None = None, sinks: Sequence[Any] = ()
    ) -> None:
        self.path, self.phase, self.sinks = Path(path), phase, list(sinks)
        if resume_step is not None and self.path.exists():
            # drop what this phase logged after the checkpoint we resume from: it will be logged again
            kept = [
                line
                for line in records.read_text(self.path).splitlines()
                if (r := _record(line)) is not None
                and (r.get("phase") != phase or not isinstance(r.get("step"), int) or r["step"] <= resume_step)
            ]
            atomic_write(self.path, "".join(line + "\n" for line in kept))
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self.t0 = time.time()

    def write(self, record: dict[str, Any]) -> None:
        if self.phase:
            record = {**record, "phase": self.phase}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for sink in self.sinks:  # after the file, which stays the record if a sink fails
            sink.log(record)

    def close(self, status: str = "completed") -> None:
        """Close the file and the sinks (once); `status` is completed, interrupted or failed."""
        self.file.close()
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close(status)

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:

        from modrun.core.stopping import Interrupted  # here, not at the top: the run-folder helpers need no torch

        stopped = isinstance(exc, (Interrupted, KeyboardInterrupt))
        self.close("completed" if exc is None else "interrupted" if stopped else "failed")


def _record(line: str) -> dict[str, Any] | None:
    """A metrics line as an object, or None for a line cut by a kill (or anything else but an object)."""
    try:
        value = json.loads(line) if line.strip() else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return records.read_jsonl(Path(run_dir) / "metrics.jsonl")


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
    if cfg.get("runs_dir"):  # findable by its meaning (a teacher, a model to prune) without reading every folder
        index.add(cfg.runs_dir, command, index.semantic_key(command, cfg), run_dir)


def alive(pid: int | None) -> bool:
    if not pid or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
