"""Depth pruning of transformers: whole blocks, or only their attention or MLP sublayers, removed for good.

Which units go is scored on calibration batches (the first `calib_batches` training batches):
- `angular` (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers"): for n units to
  remove, the start l minimising the angular distance arccos(cos(x_l, x_{l+n})) / pi between the hidden states
  entering block l and leaving block l+n-1, at the last position of each window, averaged over windows; the
  n consecutive blocks from l are removed. For sublayers, each one's distance between the stream before and
  after it, and the n smallest go.
- `cosine` (Men et al. 2024, ShortGPT's Block Influence): 1 - cos(x_in, x_out) averaged over every position;
  the n lowest go.
- `loss`: the calibration loss with that unit alone skipped minus the full model's; the n smallest go.
A removed block becomes a `Passthrough`, a removed sublayer a `ZeroBranch` with its norm a `Passthrough`; they
are recorded in model_shapes.json, so every command rebuilds the shallower model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from modrun.components.models.stages import Passthrough, ZeroBranch
from modrun.core.errors import UserError
from modrun.methods.prune.context import PruneContext

SCORES = ("angular", "cosine", "loss")
PARTS = ("block", "attention", "mlp")
# (norm, branch) child names of a pre-norm block's sublayers: modrun's gpt/vit, Llama-style, GPT-2 (HF)
SUBLAYERS = {
    "attention": (("ln1", "attn"), ("input_layernorm", "self_attn"), ("ln_1", "attn")),
    "mlp": (("ln2", "mlp"), ("post_attention_layernorm", "mlp"), ("ln_2", "mlp")),
}


def model_blocks(model: nn.Module, key: str) -> list[tuple[str, nn.Module]]:
    """The model's transformer blocks in order (its `feature_layers`), or a one-line error."""
    paths = tuple(getattr(model, "feature_layers", ()) or ())
    if not paths:
        raise UserError(f"{key}: {type(model).__name__} declares no blocks (feature_layers); a transformer is needed")
    modules = dict(model.named_modules())
    # transformer blocks keep the stream's shape and sit in one ModuleList; a CNN's stages do neither
    if not all(isinstance(modules.get(p.rpartition(".")[0]), nn.ModuleList) for p in paths):
        raise UserError(f"{key}: the blocks of {type(model).__name__} ({paths[0]}, ...) are not a list of "
                        "transformer blocks (gpt, vit, hf)")  # fmt: skip
    return [(p, modules[p]) for p in paths]


def sublayer(block: nn.Module, part: str, where: str) -> tuple[str, str]:
    """The (norm, branch) child names of `part` in a block."""
    children = dict(block.named_children())
    for norm, branch in SUBLAYERS[part]:
        if norm in children and branch in children:
            return norm, branch
    raise UserError(f"prune.part={part}: block {where} has no known {part} sublayer (children: {', '.join(children)})")


def skip_hooks(units: list[tuple[nn.Module, bool]]) -> list[Any]:
    """Skip units while the returned hooks live: a block (False) returns its input, a branch (True) zeros."""

    def skip(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        x = args[0] if args else kwargs["hidden_states"]
        return x if not isinstance(out, tuple) else (x, *out[1:])

    def zero(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        return torch.zeros_like(out) if not isinstance(out, tuple) else (torch.zeros_like(out[0]), *out[1:])

    return [m.register_forward_hook(zero if branch else skip, with_kwargs=True) for m, branch in units]


class DepthPruner:
    structured = True

    def __init__(self, ctx: PruneContext, ratio: float, score: str, part: str, calib_batches: int) -> None:
        self.model, self.score, self.part = ctx.model, score, part
        self.blocks = model_blocks(ctx.model, "prune=layers")
        self.units = len(self.blocks)
        self.remove = round(ratio * self.units)
        what = "block" if part == "block" else f"{part} sublayer"
        if self.remove < 1:
            raise UserError(f"prune.ratio={ratio}: removes no {what} of {self.units} (rounds to 0)")
        if self.remove >= self.units:
            raise UserError(f"prune.ratio={ratio}: would remove every {what} ({self.units}); keep at least one")
        self.names = [sublayer(b, part, p) for p, b in self.blocks] if part != "block" else []
        self.calibration = ctx.calibration(calib_batches) if ctx.calibration else None
        self.loss = (lambda: ctx.calibration_loss(calib_batches)) if ctx.calibration_loss else None
        self.scores: list[float] = []
        self.removed: list[int] = []

    def start(self, total_steps: int) -> None:
        if self.calibration is None:
            raise UserError("prune=layers needs calibration batches of the training data")
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                self.scores = self._losses() if self.score == "loss" else self._distances()
        finally:
            self.model.train(was_training)
        if self.score == "angular" and self.part == "block":  # Gromov: n consecutive blocks from the best start
            start = self._best_start
            self.removed = list(range(start, start + self.remove))
        else:
            self.removed = sorted(sorted(range(self.units), key=lambda i: self.scores[i])[: self.remove])
        for i in self.removed:
            path, block = self.blocks[i]
            if self.part == "block":
                self.model.set_submodule(path, Passthrough())
            else:
                norm, branch = self.names[i]
                setattr(block, norm, Passthrough())
                setattr(block, branch, ZeroBranch(self._pair[i]))

    def _units(self, child: int = 1) -> list[nn.Module]:
        """The scored modules: the blocks, or each block's branch (child 1) or its norm (child 0)."""
        if self.part == "block":
            return [b for _, b in self.blocks]
        return [getattr(b, names[child]) for (_, b), names in zip(self.blocks, self.names, strict=True)]

    def _losses(self) -> list[float]:
        base, found = self.loss(), []
        self._pair = [False] * self.units
        for unit in self._units():
            handles = skip_hooks([(unit, self.part != "block")])
            try:
                found.append(self.loss() - base)
            finally:
                for h in handles:
                    h.remove()
        if self.part != "block":
            self._pair = self._branch_pairs()
        return found

    def _branch_pairs(self) -> list[bool]:
        seen: list[bool] = [False] * self.units
        handles = [u.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, isinstance(out, tuple)))
                   for i, u in enumerate(self._units())]  # fmt: skip
        try:
            self.model(next(iter(self.calibration())))
        finally:
            for h in handles:
                h.remove()
        return seen

    def _distances(self) -> list[float]:
        """Per unit: mean angular distance at the last position, or 1 - mean cosine over all positions; for
        angular blocks, per start l of a window of `remove` blocks."""
        streams: list[list[torch.Tensor]] = []  # per batch: the stream before unit 0, after unit 0, ...
        branch = self.part != "block"
        self._pair = [False] * self.units
        current: list[torch.Tensor] = []

        def before(i: int) -> Callable:
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                if i == 0 or branch:
                    current.append((args[0] if args else kwargs["hidden_states"]).detach().float())

            return hook

        def after(i: int) -> Callable:
            def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
                if isinstance(out, tuple):
                    self._pair[i] = True
                    out = out[0]
                out = out.detach().float()
                current.append(current[-1] + out if branch else out)  # a branch adds to the stream it read

            return hook

        handles = [m.register_forward_pre_hook(before(i), with_kwargs=True) for i, m in enumerate(self._units(0))]
        handles += [m.register_forward_hook(after(i), with_kwargs=True) for i, m in enumerate(self._units())]
        try:
            for x in self.calibration():
                current.clear()
                self.model(x)
                streams.append(list(current))
        finally:
            for h in handles:
                h.remove()
        # branch: [in_0, out_0, in_1, out_1, ...]; block: [in_0, out_0, out_1, ...]
        pairs = [(2 * i, 2 * i + 1) for i in range(self.units)] if branch else [(i, i + 1) for i in range(self.units)]
        if self.score == "cosine":
            return [1.0 - _mean(streams, a, b, last=False) for a, b in pairs]
        if branch:
            return [_mean(streams, a, b, last=True, angular=True) for a, b in pairs]
        n = self.remove
        windows = [_mean(streams, s, s + n, last=True, angular=True) for s in range(self.units - n + 1)]
        self._best_start = min(range(len(windows)), key=lambda s: windows[s])
        return windows

    def after_step(self, step: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def layer_sparsity(self) -> dict[str, float]:
        return {}

    def record(self) -> dict[str, Any]:
        """What the summary keeps: which units went and every unit's (or window's) score."""
        return {"depth": {"removed": self.removed, "part": self.part, "score": self.score, "scores": self.scores}}


def _mean(streams: list[list[torch.Tensor]], a: int, b: int, last: bool, angular: bool = False) -> float:
    """Mean over windows (last) or over every position of cos(x_a, x_b), or of arccos(cos) / pi."""
    total, count = 0.0, 0
    for states in streams:
        x, y = states[a], states[b]
        if last and x.dim() == 3:
            x, y = x[:, -1], y[:, -1]
        cos = torch.nn.functional.cosine_similarity(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]), dim=-1)
        value = torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi if angular else cos
        total, count = total + float(value.double().sum()), count + value.numel()
    return total / max(count, 1)


def layers(
    ctx: PruneContext, ratio: float = 0.5, score: str = "angular", part: str = "block", calib_batches: int = 8
) -> DepthPruner:
    """Remove round(ratio x blocks) blocks (or attention / MLP sublayers) of a transformer, chosen by `score`."""
    if score not in SCORES:
        raise UserError(f"prune.score={score}: expected one of {', '.join(SCORES)}")
    if part not in PARTS:
        raise UserError(f"prune.part={part}: expected one of {', '.join(PARTS)}")
    if not 0.0 < ratio < 1.0:
        raise UserError(f"prune.ratio={ratio}: must be in (0, 1)")
    if calib_batches < 1:
        raise UserError(f"prune.calib_batches={calib_batches}: must be >= 1")
    return DepthPruner(ctx, ratio, score, part, calib_batches)
