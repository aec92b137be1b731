"""One process at a time trains a run folder: an exclusive flock on <run>/.run.lock, held while it trains.

The lock closes the window between "status.json says nobody is running it" and the `running` write that two
`modrun resume` of one run would otherwise both pass. The kernel drops the lock when its process dies, even by
SIGKILL, so a killed run never stays locked. Whoever holds the lock may also sweep away the temp files that a
kill in the middle of an atomic write left behind.
"""

from __future__ import annotations

# imports inside functions here defer fcntl (POSIX only)
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from modrun.core.errors import UserError

log = logging.getLogger("modrun")
LOCK_FILE = ".run.lock"
# modrun's own temp files: atomic_write's mkstemp names (.<name>.<8 random chars>.tmp) and checkpoint's hard
# links (.<name>.<pid>.link); nothing else in a run folder is ever removed
TEMP_PATTERNS = (re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$"), re.compile(r"^\..+\.\d+\.link$"))

_held: dict[Path, tuple[IO[str] | None, int]] = {}  # this process's locks: file and depth (re-entrant)


class RunBusy(UserError):
    """Another live process holds the run folder's lock."""


@contextmanager
def hold(run_dir: Path) -> Iterator[None]:
    """Hold the run folder's lock (re-entrant in one process); RunBusy when another process holds it."""
    key = Path(run_dir).resolve()
    if key in _held:
        f, depth = _held[key]
        _held[key] = (f, depth + 1)
        try:
            yield
        finally:
            _held[key] = (f, _held[key][1] - 1)
        return
    f = _acquire(key, run_dir)
    _held[key] = (f, 1)
    try:
        yield
    finally:
        del _held[key]
        if f is not None:
            f.close()  # closing the file releases the flock


def _acquire(key: Path, shown: Path) -> IO[str] | None:
    try:
        import fcntl
    except ImportError:  # not POSIX: status.json's pid check alone guards the run folder
        return None
    f = open(key / LOCK_FILE, "a+")  # noqa: SIM115 - held open for as long as the lock
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise RunBusy(f"{shown} is still running (pid {pid}); stop it before resuming") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Remove the temp files a killed process left in `run_dir` (only modrun's patterns, only inside it).

    Call it only while holding the run folder's lock: then no other process is writing them."""
    removed = []
    for path in sorted(Path(run_dir).rglob(".*")):
        if path.is_file() and not path.is_symlink() and any(p.match(path.name) for p in TEMP_PATTERNS):
            try:
                path.unlink()
            except OSError:
                continue
            removed.append(path)
    if removed:
        names = ", ".join(str(p.relative_to(run_dir)) for p in removed)
        log.info(f"removed {len(removed)} temp file(s) left by an earlier kill: {names}")
    return removed
