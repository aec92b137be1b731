"""Recipes: one plain function per command that wires components together and calls the loop.

Each recipe module exposes `RECIPE` (its `run`, `check` and `needs`); the CLI, validation, the lifecycle and the
data-parallel launcher all find commands here. Declared lazily, so `modrun --help` imports no torch."""

from modrun.core.registry import RECIPES

RECIPES.lazy("train", "modrun.recipes.train:RECIPE", "Supervised training of one model (config `train`).")
RECIPES.lazy(
    "distill",
    "modrun.recipes.distill:RECIPE",
    "A student learns from frozen teacher(s) through KD terms (config `distill`).",
)
RECIPES.lazy(
    "prune",
    "modrun.recipes.prune:RECIPE",
    "Prune a model, recover by fine-tuning or distillation, report cost (config `prune`).",
)
RECIPES.lazy(
    "grow",
    "modrun.recipes.grow:RECIPE",
    "Grow a trained model deeper (grow=stack) or wider (grow=net2wider), then train it.",
)
RECIPES.lazy(
    "stitch",
    "modrun.recipes.stitch:RECIPE",
    "Stitch two trained anchors (small, large) into networks of every size in between.",
)
