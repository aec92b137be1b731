"""PNG plots of a comparison (matplotlib is an optional extra: without it, no plots and no error)."""

from __future__ import annotations

# imports inside functions here defer matplotlib, an optional extra (modrun[plot])
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass


def pyplot() -> Any:
    """matplotlib.pyplot drawing to files only (never a window), or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


LABELS = {"test/top1": "test top-1 (%)", "test/bpb": "test bits per byte", "test/loss": "test loss (nats/token)"}


def score_key(row: dict[str, Any]) -> str:
    """The test metric a size plot shows: top-1 for images, bits per byte (or loss) for text."""
    if "test/ppl" in row:
        return "test/bpb" if "test/bpb" in row else "test/loss"
    return "test/top1"


def accuracy_vs_params(
    rows: list[dict[str, Any]], names: list[str], path: Path, title: str, marked: tuple[int, ...] = ()
) -> bool:
    """The test metric (`score_key`) against parameters, one annotated point per row joined in order of size;
    rows at the indices in `marked` (e.g. a stitch run's anchors) also as red stars. False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    key = score_key(rows[0])
    fig, ax = plt.subplots(figsize=(6, 4))
    ordered = sorted(rows, key=lambda r: r["params"])
    ax.plot([r["params"] for r in ordered], [r[key] for r in ordered], "o-", color="tab:blue")
    stars = [rows[i] for i in marked]
    ax.plot([r["params"] for r in stars], [r[key] for r in stars], "*", ms=14, color="tab:red")
    for r, name in zip(rows, names, strict=True):
        ax.annotate(name, (r["params"], r[key]), fontsize=8)
    ax.set(xlabel="parameters", ylabel=LABELS[key], title=title)
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
