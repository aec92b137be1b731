"""Sensitivity analysis: prune each layer alone at several sparsities (magnitude, no retraining), measure
validation accuracy, and suggest per-layer sparsities that reach a global target with the least damage."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import torch

from modrun.core.collectives import is_main
from modrun.core.errors import UserError
from modrun.core.plots import pyplot
from modrun.methods.prune.context import PruneContext

log = logging.getLogger("modrun")


class Sensitivity:
    analysis = True
    structured = False

    def __init__(self, ctx: PruneContext, sparsities: list[float], target: float) -> None:
        self.targets, self.sparsities, self.target = ctx.targets, sorted(sparsities), target

    @torch.no_grad()
    def analyse(self, evaluate_val: Any, run_dir: Path) -> dict[str, Any]:
        base = evaluate_val()
        rows = []
        for name, layer in self.targets.items():
            original = layer.weight.detach().clone()
            for s in self.sparsities:
                k = int(s * original.numel())
                threshold = original.abs().flatten().kthvalue(k).values if k > 0 else -1.0
                layer.weight.mul_(original.abs() > threshold)
                rows.append({"layer": name, "sparsity": s, "val_top1": evaluate_val(), "params": original.numel()})
                layer.weight.copy_(original)
            log.info(
                f"sensitivity {name}: "
                + ", ".join(f"{r['sparsity']:.2f}->{r['val_top1']:.1f}" for r in rows if r["layer"] == name)
            )
        if is_main():  # data-parallel: every process measured the same rows; rank 0 writes them
            with open(run_dir / "sensitivity.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=["layer", "sparsity", "val_top1", "params"])
                writer.writeheader()
                writer.writerows(rows)
            plot(rows, base, run_dir / "sensitivity.png")
        suggestion, overall = suggest(rows, base, self.target)
        log.info(
            f"suggested per-layer sparsity for a global {self.target:.2f}: "
            + ", ".join(f"{k}={v:.2f}" for k, v in suggestion.items())
            + f" (overall {overall:.3f})"
        )
        return {
            "base_val_top1": base,
            "sensitivity": rows,
            "suggested_sparsity": suggestion,
            "suggested_overall_sparsity": overall,
        }


def suggest(rows: list[dict], base: float, target: float) -> tuple[dict[str, float], float]:
    """Greedy: keep raising the sparsity of the layer whose next level costs the least accuracy per weight
    removed (measured alone), until the global sparsity reaches the target."""
    layers = {r["layer"]: r["params"] for r in rows}
    levels = {
        n: [(0.0, 0.0)] + [(r["sparsity"], max(0.0, base - r["val_top1"])) for r in rows if r["layer"] == n]
        for n in layers
    }
    at = dict.fromkeys(layers, 0)
    total = sum(layers.values())

    def overall() -> float:
        return sum(levels[n][at[n]][0] * layers[n] for n in layers) / total

    while overall() < target:
        options = [n for n in layers if at[n] + 1 < len(levels[n])]
        if not options:
            break

        def cost(n: str) -> float:
            (s0, d0), (s1, d1) = levels[n][at[n]], levels[n][at[n] + 1]
            return (d1 - d0) / max(1e-9, (s1 - s0) * layers[n])

        at[min(options, key=cost)] += 1
    return {n: levels[n][at[n]][0] for n in layers}, overall()


def plot(rows: list[dict], base: float, path: Path) -> None:

    plt = pyplot()
    if plt is None:
        log.info("matplotlib is not installed: sensitivity.png skipped (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["layer"] for r in rows):
        pts = [(r["sparsity"], r["val_top1"]) for r in rows if r["layer"] == name]
        ax.plot(*zip(*pts, strict=True), marker="o", label=name)
    ax.axhline(base, color="grey", linestyle="--", label="dense")
    ax.set_xlabel("sparsity of the layer alone")
    ax.set_ylabel("val top-1 (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sensitivity(
    ctx: PruneContext, sparsities: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95), target: float = 0.8
) -> Sensitivity:
    """Per-layer sensitivity table, CSV and plot, plus suggested per-layer sparsities for `target`."""
    bad = [s for s in [*sparsities, target] if not 0.0 <= s < 1.0]
    if bad or not sparsities:
        raise UserError(f"prune.sparsities={list(sparsities)}, prune.target={target}: need values in [0, 1)")
    return Sensitivity(ctx, list(sparsities), target)
