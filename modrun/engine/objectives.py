"""Objective helpers shared by pipelines (the base `Objective` lives with the loop in modrun/loop.py)."""

from __future__ import annotations

from typing import Any

from modrun.engine.loop import Objective


class StepSeeded(Objective):
    """An objective that draws per-step choices (a width, a stitch point) from a generator seeded by the step;
    the step travels in the checkpoint, so a resumed run draws the same ones."""

    step = 0
    varying_graph = True  # a width or a stitch drawn per step leaves the other ones' parameters without gradient

    def after_step(self, step: int) -> None:
        self.step = step

    def extra_state(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.step = int(state.get("step", 0))
