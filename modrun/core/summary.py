"""Reading summary.json: flat metric keys and a sweep's objective value."""

from __future__ import annotations

from typing import Any

from modrun.core.records import section

# metrics where less is better (errors, costs); every other one (accuracies) is maximised
LOWER_IS_BETTER = ("loss", "ppl", "bpb", "params", "nonzero_params", "macs", "wall_time_s")


def direction_of(metric: str) -> str:
    """`minimize` or `maximize`: how a metric of summary.json is ranked when nobody said."""
    leaf = metric.rsplit("/", 1)[-1]
    return "minimize" if leaf in LOWER_IS_BETTER or leaf.startswith("latency") else "maximize"


def objective_value(summary: dict[str, Any], key: str) -> float | None:
    value = flatten_summary(summary).get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def flatten_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """summary.json as flat columns: final metrics as they are, best ones as best/<key>, scalar extras."""
    if not isinstance(summary, dict):
        return {}
    flat: dict[str, Any] = dict(section(summary, "final"))
    flat.update({f"best/{k}": v for k, v in section(summary, "best").items()})
    flat.update({k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return flat
