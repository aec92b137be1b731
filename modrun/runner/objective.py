"""Which metrics a command's summary.json holds, so that a sweep's objective (or `runs compare --objective`)
can be checked before anything runs: a typo there would rank every job as None, silently."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from modrun.core.errors import UserError, did_you_mean
from modrun.core.registry import RECIPES
from modrun.core.summary import direction_of

# what evaluation reports per split, by the data's task (components/data/tasks.py: Task.metrics)
TASK_METRICS = {"classification": ("loss", "top1", "top5"), "language_modeling": ("loss", "top1", "ppl", "bpb")}
BEST = {"classification": "top1", "language_modeling": "loss"}  # Task.best of components/data/tasks.py
# numbers every training command writes: the loop's counters, the run's wall time, the cost report
COMMON = ("steps", "epochs", "wall_time_s", "params", "nonzero_params", "macs", "latency_ms_batch1")


def task_of(cfg: DictConfig) -> str:
    data = cfg.get("data")
    return str(data.get("task", "classification")) if isinstance(data, DictConfig) else "classification"


def sweep_objective(cfg: DictConfig) -> tuple[str, str]:
    """The metric a sweep ranks its jobs by, and its direction: sweep.objective and sweep.direction, or where
    they are null, the task's best-epoch metric (val/top1 for images, val/loss for text) and its natural way."""
    node = cfg.get("sweep") or {}
    objective = node.get("objective") or f"val/{BEST.get(task_of(cfg), 'top1')}"
    return str(objective), str(node.get("direction") or direction_of(str(objective)))


def objective_names(command: str, cfg: DictConfig) -> list[str]:
    """Every key `objective_value` can find in this command's summary.json for this config."""
    task = task_of(cfg)
    metrics = TASK_METRICS.get(task, TASK_METRICS["classification"])
    split_keys = [f"{s}/{m}" for s in ("val", "test") for m in metrics]
    # the best epoch records the metric that chose it (engine/loop.py) and the test metrics of best.pt
    best = ["best/epoch", f"best/val/{BEST[task] if task in BEST else 'top1'}", *(f"best/test/{m}" for m in metrics)]
    extra = getattr(RECIPES.get(command), "summary_keys", ())
    return sorted({*split_keys, *best, *COMMON, *extra})


def check_objective(command: str, cfg: DictConfig, objective: str) -> None:
    """sweep.objective must be a metric the command writes: exit 2 naming the closest one."""
    names = objective_names(command, cfg)
    if objective not in names:
        raise UserError(f"sweep.objective={objective}: {command} writes no such metric{_hint(objective, names)}")


def _hint(name: str, names: list[str] | set[str]) -> str:
    """Accuracy is top-1 here: val/acc and val/accuracy are pointed at val/top1, not at the nearest spelling."""
    head, _, leaf = name.rpartition("/")
    if leaf in ("acc", "accuracy", "acc1", "top_1") and f"{head}/top1" in names:
        return f" — did you mean {head}/top1?"
    return did_you_mean(name, names)


def check_ranked_by(objective: str, metrics: list[dict[str, Any]]) -> None:
    """`runs compare --objective`: a name that none of the runs holds (while they hold metrics) ranks nothing."""
    present = {k for m in metrics for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if present and objective not in present:
        raise UserError(f"--objective {objective}: no run has this metric{_hint(objective, present)}")
