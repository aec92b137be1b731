"""The sweep folder's own files: sweep.json (command, overrides, jobs and their states) and summary.csv.

Jobs may run in several processes at once (joblib, submitit), so every read-modify-write of sweep.json
happens under an exclusive file lock, and both files are replaced atomically.
"""

from __future__ import annotations

# imports inside functions here defer fcntl (POSIX) and the summaries: `modrun runs` lists sweeps without them
import csv
import io
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from modrun.core.records import RecordError, inside, try_json
from modrun.core.runfolder import atomic_write, read_json, write_json

SWEEP_FILE, SUMMARY_FILE, LOCK_FILE = "sweep.json", "summary.csv", ".sweep.lock"


def now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


@contextmanager
def _locked(sweep_dir: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: jobs of one sweep then should not run in parallel processes
        yield
        return
    with open(Path(sweep_dir) / LOCK_FILE, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def write_sweep(sweep_dir: Path, record: dict[str, Any]) -> None:
    with _locked(sweep_dir):
        write_json(Path(sweep_dir) / SWEEP_FILE, record)
        write_summary(sweep_dir, record)


def update_sweep(sweep_dir: Path, **fields: Any) -> None:
    with _locked(sweep_dir):
        record = read_json(Path(sweep_dir) / SWEEP_FILE)
        record.update(fields)
        write_json(Path(sweep_dir) / SWEEP_FILE, record)


def update_job(sweep_dir: Path, num: int, **fields: Any) -> None:
    """Set fields of job `num` (added when a sweeper such as optuna makes jobs as it goes); refresh the CSV."""
    with _locked(sweep_dir):
        record = read_json(Path(sweep_dir) / SWEEP_FILE)
        jobs = record["jobs"]
        job = next((j for j in jobs if j["num"] == num), None)
        if job is None:
            job = {"num": num}
            jobs.append(job)
            jobs.sort(key=lambda j: j["num"])
        job.update(fields)
        write_json(Path(sweep_dir) / SWEEP_FILE, record)
        write_summary(sweep_dir, record)


def job_state(sweep_dir: Path, job: dict[str, Any]) -> str:
    """A job's state as its own run folder tells it (the folder's status.json is the truth, not sweep.json)."""
    folder = job_folder(sweep_dir, job)
    if folder is None:
        return "bad record"
    status, problem = try_json(folder / "status.json")
    if problem:
        return "damaged"
    return str((status or job).get("state", "pending"))


def job_folder(sweep_dir: Path, job: Any) -> Path | None:
    """A job's run folder, inside the sweep folder; None when sweep.json names none there (damaged, or '../x')."""
    try:
        return inside(sweep_dir, job.get("run_dir") if isinstance(job, dict) else None, Path(sweep_dir) / SWEEP_FILE)
    except RecordError:
        return None


def write_summary(sweep_dir: Path, record: dict[str, Any]) -> None:
    """summary.csv: one row per job: its overrides, state, objective and the metrics of its summary.json."""
    from modrun.core.summary import flatten_summary

    rows = []
    for job in record["jobs"]:
        folder = job_folder(sweep_dir, job)
        summary = try_json(folder / "summary.json")[0] if folder is not None else None
        metrics = flatten_summary(summary or {})
        rows.append(
            {
                "job": job["num"],
                "state": job.get("state", "pending"),
                "objective": job.get("objective"),
                "overrides": " ".join(job.get("overrides", [])),
                **metrics,
                "run_dir": job.get("run_dir", ""),
            }
        )
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(Path(sweep_dir) / SUMMARY_FILE, out.getvalue())
