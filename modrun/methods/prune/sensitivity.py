"""Sensitivity analysis, no retraining: how much the validation metric (the task's: top-1 for images, loss for
text) suffers when one part of the model is damaged alone.

- `unit=weight`: each layer's weights magnitude-pruned alone at several sparsities; per-layer sparsities that
  reach a global target with the least damage are suggested.
- `unit=layer` (transformers): each block skipped alone, then only its attention, then only its MLP sublayer
  (the branch's output zeroed, as `prune=layers part=...` would remove it); the units ranked by damage, least
  first (measured on val; `prune=layers score=loss` measures the same on training batches).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from modrun.core.collectives import is_main
from modrun.core.errors import UserError
from modrun.core.plots import pyplot
from modrun.methods.prune.context import PruneContext
from modrun.methods.prune.depth import PARTS, model_blocks, skip_hooks, sublayer

log = logging.getLogger("modrun")
UNITS = ("weight", "layer")


class Sensitivity:
    analysis = True
    structured = False

    def __init__(self, ctx: PruneContext, unit: str, sparsities: list[float], target: float) -> None:
        self.model, self.unit = ctx.model, unit
        self.targets, self.sparsities, self.target = ctx.targets, sorted(sparsities), target
        self.blocks = model_blocks(ctx.model, "prune.unit=layer") if unit == "layer" else []
        for path, block in self.blocks:  # a block without known sublayers: the one-line error now, before any work
            for part in PARTS[1:]:
                sublayer(block, part, path)

    @torch.no_grad()
    def analyse(self, evaluate_val: Callable[[], float], metric: str, maximize: bool, run_dir: Path) -> dict[str, Any]:
        """Measure every unit; write sensitivity.csv and .png; return what summary.json records."""
        base, column = evaluate_val(), f"val_{metric}"
        measure = self._layer_rows if self.unit == "layer" else self._weight_rows
        rows = measure(evaluate_val, column)
        if is_main():  # data-parallel: every process measured the same rows; rank 0 writes them
            with open(run_dir / "sensitivity.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
            plot(rows, base, column, self.unit, run_dir / "sensitivity.png")
        damage = [(base - r[column]) if maximize else (r[column] - base) for r in rows]  # < 0: it helped
        result: dict[str, Any] = {"final": {f"val/{metric}": base}, "sensitivity": rows}
        if self.unit == "layer":
            ranked = {
                part: sorted((i for i, r in enumerate(rows) if r["part"] == part), key=lambda i: damage[i])
                for part in PARTS
            }
            result["least_damaging"] = {part: [rows[i]["block"] for i in order] for part, order in ranked.items()}
            log.info("least damaging first: " + "; ".join(f"{p} {v}" for p, v in result["least_damaging"].items()))
            return result
        suggestion, overall = suggest(rows, [max(0.0, d) for d in damage], self.target)
        log.info(
            f"suggested per-layer sparsity for a global {self.target:.2f}: "
            + ", ".join(f"{k}={v:.2f}" for k, v in suggestion.items())
            + f" (overall {overall:.3f})"
        )
        return {**result, "suggested_sparsity": suggestion, "suggested_overall_sparsity": overall}

    def _weight_rows(self, evaluate_val: Callable[[], float], column: str) -> list[dict[str, Any]]:
        rows = []
        for name, layer in self.targets.items():
            original = layer.weight.detach().clone()
            for s in self.sparsities:
                k = int(s * original.numel())
                threshold = original.abs().flatten().kthvalue(k).values if k > 0 else -1.0
                layer.weight.mul_(original.abs() > threshold)
                rows.append({"layer": name, "sparsity": s, column: evaluate_val(), "params": original.numel()})
                layer.weight.copy_(original)
            mine = rows[-len(self.sparsities) :]
            log.info(f"sensitivity {name}: " + ", ".join(f"{r['sparsity']:.2f}->{r[column]:.4g}" for r in mine))
        return rows

    def _layer_rows(self, evaluate_val: Callable[[], float], column: str) -> list[dict[str, Any]]:
        rows = []
        for i, (path, block) in enumerate(self.blocks):
            for part in PARTS:
                unit = block if part == "block" else getattr(block, sublayer(block, part, path)[1])
                handles = skip_hooks([(unit, part != "block")])
                try:
                    value = evaluate_val()
                finally:
                    for h in handles:
                        h.remove()
                params = sum(p.numel() for p in unit.parameters())
                rows.append({"block": i, "layer": path, "part": part, column: value, "params": params})
            log.info(f"sensitivity {path}: " + ", ".join(f"{r['part']} {r[column]:.4g}" for r in rows[-len(PARTS) :]))
        return rows


def suggest(rows: list[dict], damage: list[float], target: float) -> tuple[dict[str, float], float]:
    """Greedy: keep raising the sparsity of the layer whose next level costs the least metric per weight
    removed (measured alone), until the global sparsity reaches the target."""
    layers = {r["layer"]: r["params"] for r in rows}
    levels = {n: [(0.0, 0.0)] for n in layers}
    for r, d in zip(rows, damage, strict=True):
        levels[r["layer"]].append((r["sparsity"], d))
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


def plot(rows: list[dict], base: float, column: str, unit: str, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        log.info("matplotlib is not installed: sensitivity.png skipped (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if unit == "layer":  # one group of bars per block: the block, its attention, its MLP skipped alone
        for k, part in enumerate(PARTS):
            pts = [(r["block"] + (k - 1) * 0.27, r[column]) for r in rows if r["part"] == part]
            ax.bar(*zip(*pts, strict=True), width=0.27, label=f"{part} skipped")
        ax.set_xlabel("block")
    else:
        for name in dict.fromkeys(r["layer"] for r in rows):
            pts = [(r["sparsity"], r[column]) for r in rows if r["layer"] == name]
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax.set_xlabel("sparsity of the layer alone")
    ax.axhline(base, color="grey", linestyle="--", label="dense")
    ax.set_ylabel(column.replace("_", " "))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sensitivity(
    ctx: PruneContext,
    unit: str = "weight",
    sparsities: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95),
    target: float = 0.8,
) -> Sensitivity:
    """Per-layer (or per-block) sensitivity table, CSV and plot; for weights, per-layer sparsities for `target`."""
    if unit not in UNITS:
        raise UserError(f"prune.unit={unit}: valid units are {', '.join(UNITS)} (layer: transformer blocks)")
    bad = [s for s in [*sparsities, target] if not 0.0 <= s < 1.0]
    if bad or not sparsities:
        raise UserError(f"prune.sparsities={list(sparsities)}, prune.target={target}: need values in [0, 1)")
    return Sensitivity(ctx, unit, list(sparsities), target)
