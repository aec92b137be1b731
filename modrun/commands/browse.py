"""Tables for people: registered components, run folders, one run in detail."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from modrun.core.errors import UserError, did_you_mean
from modrun.core.records import read_json, read_lines, section, try_json
from modrun.core.registry import REGISTRIES
from modrun.core.runfolder import PREREQUISITES, read_metrics

console = Console(width=None if sys.stdout.isatty() else 160)


def list_registry(group: str | None) -> None:
    if group is not None and group not in REGISTRIES:
        singular = {k.rstrip("s"): k for k in REGISTRIES}
        if group in singular:
            group = singular[group]
        else:
            raise UserError(f"unknown group '{group}'{did_you_mean(group, REGISTRIES)}")
    for name in [group] if group else list(REGISTRIES):
        table = Table(title=name, title_justify="left", show_header=False, box=None, padding=(0, 2))
        for entry, summary in REGISTRIES[name].summaries():
            table.add_row(f"[bold]{entry}[/bold]", summary)
        console.print(table)


def find_runs(runs_dir: Path) -> list[Path]:
    """Run folders under runs_dir (runs/<command>/<run>, and sweep jobs runs/sweeps/<sweep>/<job>), oldest first."""
    found = {
        p.parent for pattern in ("*/*/status.json", "sweeps/*/*/status.json") for p in Path(runs_dir).glob(pattern)
    }
    # folder names start with their timestamp: a sweep's jobs sort by the sweep's, then by job number
    return sorted(found, key=lambda p: (p.parent.name, p.name) if p.parent.parent.name == "sweeps" else (p.name, ""))


def _warn(message: str) -> None:
    print(f"modrun: warning: {message}", file=sys.stderr)


def _summary(run: Path) -> dict:
    """summary.json, or {} when absent; a damaged one is a warning: the rest of the run is still shown."""
    summary, problem = try_json(run / "summary.json")
    if problem:
        _warn(problem)
    return summary or {}


def _fmt(value: object) -> str:
    """A table cell: floats to 2 places; text from a record is escaped (a '[' is not rich markup)."""
    return f"{value:.2f}" if isinstance(value, float) else ("" if value is None else escape(str(value)))


def _metric(metrics: dict, split: str, names: tuple[str, ...]) -> str:
    """The first of `names` the run has for `split`, named: `top1 97.22` (images) or `bpb 2.88` (text)."""
    for name in names:
        value = metrics.get(f"{split}/{name}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return f"{name} {_fmt(float(value))}"
    return ""


def list_runs(runs_dir: Path) -> None:
    if not Path(runs_dir).is_dir():
        raise UserError(f"runs folder '{runs_dir}' does not exist")
    table = Table("run", "command", "state", "started", "best val", "test", "params")
    for run in find_runs(runs_dir):
        status, problem = try_json(run / "status.json")
        if problem:  # one damaged folder is listed as such, and hides none of the others
            _warn(problem)
        status, summary = status or {"state": "damaged"}, _summary(run)
        table.add_row(
            _fmt(str(run)),
            _fmt(status.get("command", "?")),
            _fmt(status.get("state", "?")),
            _fmt(status.get("started", "")),
            _metric(section(summary, "best"), "val", ("top1", "loss")),
            _metric(section(summary, "final"), "test", ("bpb", "ppl", "top1")),
            _fmt(summary.get("params")),
        )
    console.print(table)


def _prerequisites(run_dir: Path) -> list[dict]:
    try:
        records = read_json(run_dir / PREREQUISITES, list) if (run_dir / PREREQUISITES).is_file() else []
    except (OSError, ValueError):
        return []
    return [r for r in records if isinstance(r, dict)] if isinstance(records, list) else []


def show_run(run_dir: Path) -> None:
    run_dir = Path(run_dir)
    if not (run_dir / "status.json").is_file():
        raise UserError(f"'{run_dir}' is not a modrun run folder (no status.json)")
    status = read_json(run_dir / "status.json")
    console.print(f"[bold]{run_dir}[/bold]  {status.get('command')}  state={status.get('state')}", markup=False)
    if status.get("error"):
        console.print(f"error: {status['error']}", markup=False)
    overrides = read_lines(run_dir / "overrides.txt")
    console.print("overrides: " + (" ".join(overrides) or "(none)"), markup=False)
    for need in _prerequisites(run_dir):  # the runs this one needed first, and how each was found
        digest = str(need.get("sha256"))[:12]
        console.print(
            f"{need.get('role')}: {need.get('run')} ({need.get('how')}, weights sha256 {digest}...)", markup=False
        )
    summary = _summary(run_dir)
    if summary:
        table = Table("metric", "final", "best")
        final, best = section(summary, "final"), section(summary, "best")
        for k in sorted(set(final) | set(best), key=str):
            table.add_row(_fmt(str(k)), _fmt(final.get(k)), _fmt(best.get(k)))
        console.print(table)
        extras = {k: v for k, v in summary.items() if k not in ("final", "best")}
        console.print(json.dumps(extras, indent=2), markup=False)
    metrics = [m for m in read_metrics(run_dir) if m.get("split") == "val"]
    if metrics:
        console.print(f"last val record: {json.dumps(metrics[-1])}", markup=False)
