"""`modrun runs compare`: rank a sweep's runs (or any run folders) by an objective, with mean ± std over
seeds, a CSV, and PNG plots (metric curves; accuracy against parameters and latency, Pareto front marked)."""

from __future__ import annotations

# imports inside functions here defer matplotlib (optional): `modrun compare` without plots needs none
import csv
import io
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from modrun.core.errors import UserError
from modrun.core.plots import pareto_front, pyplot
from modrun.core.records import RecordError, inside, read_json, read_lines, try_json
from modrun.core.runfolder import atomic_write, read_metrics
from modrun.core.summary import direction_of, flatten_summary
from modrun.runner.objective import check_ranked_by

console = Console(width=None if sys.stdout.isatty() else 200)
COST_KEYS = ("params", "nonzero_params", "macs")
LATENCY_KEYS = ("latency_ms_batch1", "latency_ms_cpu_b1", "latency_ms_cpu_b64")
# shown where they differ between runs (a classification run has no bpb, a language model's best is by loss)
SHOWN = ("val/top1", "test/top1", "val/bpb", "test/bpb", "best/val/top1", "best/val/loss")
SHOWN += (*COST_KEYS, *LATENCY_KEYS, "wall_time_s")


@dataclass
class Entry:
    """One run as the comparison sees it."""

    name: str
    run_dir: Path
    state: str
    overrides: dict[str, str]
    metrics: dict[str, Any] = field(default_factory=dict)


def collect(paths: list[Path]) -> tuple[list[Entry], str, str]:
    """The runs behind `paths` (sweep folders and run folders), and the objective and direction to rank by (the
    sweep's; for run folders alone, the task's best-epoch metric)."""
    entries: list[Entry] = []
    objective, direction = None, None
    for path in paths:
        path = Path(path)
        if (path / "sweep.json").is_file():
            sweep = read_json(path / "sweep.json")
            jobs = sweep.get("jobs", [])
            if not isinstance(jobs, list):
                raise RecordError(f"{path / 'sweep.json'}: 'jobs' is not a list")
            objective = str(sweep.get("objective") or objective or "val/top1")
            direction = "minimize" if sweep.get("direction") == "minimize" else "maximize"
            for i, job in enumerate(jobs):
                job = job if isinstance(job, dict) else {}
                name = str(job.get("run_dir") or job.get("num", i))
                try:
                    run = inside(path, job.get("run_dir"), path / "sweep.json")
                except RecordError as e:  # a job whose folder is damaged or points outside is listed as bad
                    _warn(e.messages[0])
                    run = None
                overrides = job.get("overrides") if isinstance(job.get("overrides"), list) else []
                entries.append(_entry(name if len(paths) == 1 else f"{path.name}/{name}", run, overrides))
        elif (path / "status.json").is_file():
            entries.append(_entry(str(path), path, read_lines(path / "overrides.txt")))
        else:
            raise UserError(f"'{path}' is neither a sweep folder (sweep.json) nor a run folder (status.json)")
    if objective is None:  # run folders alone: a language model's runs rank by val loss (best epoch's metric)
        lm = any("val/ppl" in e.metrics for e in entries)
        objective, direction = ("val/loss", "minimize") if lm else ("val/top1", "maximize")
    return entries, objective, str(direction)


def _entry(name: str, run: Path | None, overrides: list[str] | None) -> Entry:
    if run is None:
        return Entry(name, Path(name), "bad record", {})
    status, problem = try_json(run / "status.json")
    summary, bad_summary = try_json(run / "summary.json")
    for p in (problem, bad_summary):
        if p:  # a damaged record is a warning: the other runs are still compared
            _warn(p)
    pairs = dict(str(o).lstrip("+~").split("=", 1) for o in overrides or [] if "=" in str(o))
    state = "damaged" if problem else str((status or {}).get("state", "pending"))
    return Entry(name, run, state, pairs, flatten_summary(summary or {}))


def _warn(message: str) -> None:
    print(f"modrun: warning: {message}", file=sys.stderr)


def varying(entries: list[Entry]) -> list[str]:
    """The override keys whose values differ between runs: what the comparison is about."""
    keys = sorted({k for e in entries for k in e.overrides})
    return [k for k in keys if len({e.overrides.get(k) for e in entries}) > 1]


def compare(paths: list[Path], objective: str | None = None, plots: bool = True, out: Path | None = None) -> Path:
    """Print the ranked table (and seed means), write compare.csv and plots; return the folder written to."""
    entries, sweep_objective, direction = collect(paths)
    if not entries:
        raise UserError("nothing to compare: no runs found")
    if objective:  # a name of the user's: one that no run holds would rank nothing
        check_ranked_by(objective, [e.metrics for e in entries])
        direction = direction if objective == sweep_objective else direction_of(objective)
    objective = objective or sweep_objective
    keys = varying(entries)
    sign = -1.0 if direction == "maximize" else 1.0

    def rank(e: Entry) -> tuple[int, float]:
        value = _number(e.metrics.get(objective))
        return (1, 0.0) if value is None else (0, sign * value)

    entries.sort(key=rank)
    # columns whose value is the same for every run say nothing about the comparison
    shown = [objective, *(k for k in SHOWN if k != objective and len({str(e.metrics.get(k)) for e in entries}) > 1)]
    title = escape(f"ranked by {objective} ({direction})")
    table = Table("#", "run", "state", *map(escape, keys), *map(escape, shown), title=title)
    for i, e in enumerate(entries, 1):
        table.add_row(
            str(i),
            _fmt(e.name),
            _fmt(e.state),
            *(_fmt(e.overrides.get(k, "")) for k in keys),
            *(_fmt(e.metrics.get(k)) for k in shown),
        )
    console.print(table)
    _print_seed_means(entries, keys, shown)
    out = (
        Path(out)
        if out
        else (Path(paths[0]) if len(paths) == 1 and (Path(paths[0]) / "sweep.json").is_file() else Path("compare"))
    )
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_csv(out / "compare.csv", entries, keys, shown)
    except OSError as e:
        raise UserError(f"--out {out}: cannot write compare.csv there ({e.strerror or e})") from None
    if plots:
        from modrun.runner.compare import plot_comparison

        written = plot_comparison(entries, objective, direction, out)
        console.print("plots: " + (", ".join(str(p) for p in written) or "none (pip install 'modrun[plot]')"))
    return out


def _print_seed_means(entries: list[Entry], keys: list[str], shown: list[str]) -> None:
    """Runs that differ only by seed, as mean ± std (n) of each metric."""
    if "seed" not in keys:
        return
    rest = [k for k in keys if k != "seed"]
    groups: dict[tuple, list[Entry]] = {}
    for e in entries:
        if e.state == "completed":
            groups.setdefault(tuple(e.overrides.get(k, "") for k in rest), []).append(e)
    if not any(len(g) > 1 for g in groups.values()):
        return
    shown = [k for k in shown if k not in (*COST_KEYS, *LATENCY_KEYS)]  # the same model's cost, up to timing noise
    table = Table(*map(escape, rest), "n", *map(escape, shown), title="mean ± std over seeds")
    for group_key, group in groups.items():
        cells = []
        for k in shown:
            values = [v for e in group if (v := _number(e.metrics.get(k))) is not None]
            cells.append(_mean_std(values))
        table.add_row(*map(_fmt, group_key), str(len(group)), *cells)
    console.print(table)


def _mean_std(values: list[float]) -> str:
    if not values:
        return ""
    if len(values) == 1:
        return _fmt(values[0])
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _write_csv(path: Path, entries: list[Entry], keys: list[str], shown: list[str]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["rank", "run", "state", *keys, *shown, "run_dir"])
    for i, e in enumerate(entries, 1):
        writer.writerow(
            [
                i,
                e.name,
                e.state,
                *(e.overrides.get(k, "") for k in keys),
                *(e.metrics.get(k, "") for k in shown),
                e.run_dir,
            ]
        )
    atomic_write(path, buffer.getvalue())


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 1e6 else f"{value:.3g}"
    return "" if value is None else escape(str(value))  # text from a record: a '[' is not rich markup


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def val_curve(run_dir: Path, metric: str = "top1") -> tuple[list[int], list[float]]:
    """The val records of a run's last phase (a run's final model comes from it)."""
    records = [r for r in read_metrics(run_dir) if r.get("split") == "val" and metric in r]
    if records:
        last_phase = records[-1].get("phase")
        records = [r for r in records if r.get("phase") == last_phase]
    records = [r for r in records if _number(r.get("epoch")) is not None and _number(r[metric]) is not None]
    return [r["epoch"] for r in records], [r[metric] for r in records]


def plot_comparison(entries: list[Entry], objective: str, direction: str, out: Path) -> list[Path]:
    """curves.png (the objective's val metric per epoch of every run; val top-1 where the objective is not a val
    metric) and pareto.png (objective against each cost measured)."""
    plt = pyplot()
    if plt is None:
        return []
    from modrun.runner.compare import LATENCY_KEYS, val_curve

    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    metric = objective.rsplit("/", 1)[-1] if objective.removeprefix("best/").startswith("val/") else "top1"
    for e in entries:
        epochs, values = val_curve(e.run_dir, metric)
        if epochs:
            ax.plot(epochs, values, marker="o", markersize=3, label=e.name[-40:])
    ax.set(xlabel="epoch", ylabel=f"val {metric}", title=f"validation {metric} per epoch")
    if len(entries) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)
    written.append(out / "curves.png")

    costs = [k for k in ("nonzero_params", *LATENCY_KEYS) if any(k in e.metrics for e in entries)][:2]
    if costs:
        fig, axes = plt.subplots(1, len(costs), figsize=(6 * len(costs), 4.5), squeeze=False)
        for ax, cost in zip(axes[0], costs, strict=False):
            pairs = [(_number(e.metrics.get(cost)), _number(e.metrics.get(objective))) for e in entries]
            points = [(x, y) for x, y in pairs if x is not None and y is not None]
            ax.scatter([p[0] for p in points], [p[1] for p in points], label="runs")
            front = pareto_front(points, maximize=direction == "maximize")
            ax.plot([p[0] for p in front], [p[1] for p in front], "r-o", label="Pareto front")
            ax.set(xlabel=cost, ylabel=objective, title=f"{objective} vs {cost}")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "pareto.png", dpi=120)
        plt.close(fig)
        written.append(out / "pareto.png")
    return written
