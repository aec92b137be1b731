"""PNG plots of a comparison (matplotlib is an optional extra: without it, no plots and no error)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modrun.compare import Entry


def pyplot() -> Any:
    """matplotlib.pyplot drawing to files only (never a window), or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def accuracy_vs_params(
    rows: list[dict[str, Any]], names: list[str], path: Path, title: str, marked: tuple[int, ...] = ()
) -> bool:
    """Test top-1 against parameters, one annotated point per row joined in order of size; rows at the indices
    in `marked` (e.g. a stitch run's anchors) also as red stars. False when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    ordered = sorted(rows, key=lambda r: r["params"])
    ax.plot([r["params"] for r in ordered], [r["test/top1"] for r in ordered], "o-", color="tab:blue")
    stars = [rows[i] for i in marked]
    ax.plot([r["params"] for r in stars], [r["test/top1"] for r in stars], "*", ms=14, color="tab:red")
    for r, name in zip(rows, names, strict=True):
        ax.annotate(name, (r["params"], r["test/top1"]), fontsize=8)
    ax.set(xlabel="parameters", ylabel="test top-1 (%)", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def pareto_front(points: list[tuple[float, float]], maximize: bool = True) -> list[tuple[float, float]]:
    """Points (cost, score) that no other point beats on both: lower cost and better score. Sorted by cost."""
    front: list[tuple[float, float]] = []
    best = None
    for cost, score in sorted(points, key=lambda p: (p[0], -p[1] if maximize else p[1])):
        if best is None or (score > best if maximize else score < best):
            front.append((cost, score))
            best = score
    return front


def plot_comparison(entries: list[Entry], objective: str, direction: str, out: Path) -> list[Path]:
    """curves.png (val top-1 per epoch of every run) and pareto.png (objective against each cost measured)."""
    plt = pyplot()
    if plt is None:
        return []
    from modrun.compare import LATENCY_KEYS, val_curve

    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for e in entries:
        epochs, values = val_curve(e.run_dir)
        if epochs:
            ax.plot(epochs, values, marker="o", markersize=3, label=e.name[-40:])
    ax.set(xlabel="epoch", ylabel="val top-1 (%)", title="validation accuracy")
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
            points = [
                (float(e.metrics[cost]), float(e.metrics[objective]))
                for e in entries
                if e.metrics.get(cost) is not None and e.metrics.get(objective) is not None
            ]
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
