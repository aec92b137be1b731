"""Pruning: unstructured masks with one-shot and gradual schedules, and structured channel pruning
(through Torch-Pruning's dependency graph) that makes models physically smaller."""

from modrun.core.registry import PRUNERS

_U = "modrun.methods.prune.unstructured"
PRUNERS.lazy("magnitude", f"{_U}:magnitude", "one-shot L1 magnitude pruning, per layer or global")
PRUNERS.lazy("random", f"{_U}:random", "one-shot random pruning (the baseline any method must beat)")
PRUNERS.lazy("lamp", f"{_U}:lamp", "layer-adaptive magnitude-based pruning scores, global (Lee et al. ICLR 2021)")
PRUNERS.lazy(
    "gradual_magnitude", f"{_U}:gradual_magnitude", "magnitude pruning on the cubic schedule of Zhu & Gupta 2017"
)
PRUNERS.lazy(
    "wanda", "modrun.methods.prune.wanda:wanda", "|weight| x input-activation norm per output row, or N:M (Sun 2024)"
)
PRUNERS.lazy(
    "imp", "modrun.methods.prune.imp:imp", "iterative magnitude pruning with weight rewinding (Frankle et al.)"
)
PRUNERS.lazy(
    "sensitivity", "modrun.methods.prune.sensitivity:sensitivity", "per-layer sensitivity table, plot, suggestions"
)
PRUNERS.lazy(
    "layers", "modrun.methods.prune.depth:layers", "remove whole blocks or attention/MLP sublayers (Gromov, ShortGPT)"
)
PRUNERS.lazy(
    "channel", "modrun.methods.prune.structured:channel", "structured channel pruning via Torch-Pruning (Fang 2023)"
)

# keys of the prune node the runner reads (which layers); the others are the pruner's own arguments
RUNNER_KEYS = {"name", "include", "exclude", "types"}
