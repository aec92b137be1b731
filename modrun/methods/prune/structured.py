"""Structured channel pruning through Torch-Pruning's dependency graph: coupled layers (a conv, its BN,
the next conv's inputs, residual partners) lose the same channels, and the result is a dense, smaller model.

On a transformer (a model whose blocks hold attention), `ratio` of every block's attention heads (whole heads:
their q, k, v rows and output-projection columns) and of its MLP hidden neurons are removed; the residual
stream's width (embeddings, norms, a tied head) and the vocabulary never shrink."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modrun.components.models.stages import PrefixLinear
from modrun.core.errors import UserError
from modrun.methods.prune.context import PruneContext
from modrun.methods.prune.heads import llama_blocks, prune_llama, rewrite_config

IMPORTANCE = ("l1", "l2", "group_l2", "taylor", "random")


class ChannelPruner:
    structured = True

    def __init__(
        self, ctx: PruneContext, ratio: float, importance: str, global_pruning: bool, calib_batches: int
    ) -> None:
        self.model, self.targets, self.ratio, self.num_classes = ctx.model, ctx.targets, ratio, ctx.num_classes
        self.importance, self.global_pruning, self.example = importance, global_pruning, ctx.example
        self.seed, self.sizes, self.hf_config = ctx.seed, None, None
        self.backward, self.calib_batches = ctx.calibration_backward, calib_batches

    def start(self, total_steps: int) -> None:
        """Remove the channels now (once); training afterwards recovers accuracy."""
        try:
            import torch_pruning as tp
        except ImportError:  # pragma: no cover - it is a dependency, but say what to do if it went missing
            raise UserError("prune=channel needs Torch-Pruning: pip install torch-pruning") from None
        if any(isinstance(m, PrefixLinear) for m in self.model.modules()):  # its input slice is invisible to the graph
            raise UserError("prune=channel: this model reads a prefix of its embedding (a matryoshka cut-out)")
        if self.importance == "taylor":  # Molchanov et al. 2019: |w x dL/dw| on calibration batches
            if self.backward is None:
                raise UserError("prune.importance=taylor needs calibration batches of the training data")
            self.backward(self.calib_batches)
        llama = llama_blocks(self.model)
        if llama:  # Hugging Face Llama-style blocks: sliced by hand (see heads.py for why)
            self.sizes = prune_llama(llama, self.ratio, self.importance, self.global_pruning, self.seed)
            config = getattr(getattr(self.model, "model", None), "config", None)
            if config is not None and rewrite_config(config, self.sizes, int(llama[0][0].head_dim)):
                self.hf_config = config
            self.model.zero_grad(set_to_none=True)  # taylor's gradients were the calibration's, not training's
            return
        importance = {
            "l1": lambda: tp.importance.MagnitudeImportance(p=1, group_reduction="first"),
            "l2": lambda: tp.importance.MagnitudeImportance(p=2, group_reduction="first"),
            "group_l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
            "taylor": lambda: tp.importance.TaylorImportance(group_reduction="sum"),  # over every weight the unit owns
            "random": lambda: tp.importance.RandomImportance(),
        }[self.importance]()
        targeted = {id(m) for m in self.targets.values()}

        def keep(m: nn.Module) -> bool:  # not targeted, or the classifier: its outputs are the classes
            return id(m) not in targeted or (isinstance(m, nn.Linear) and m.out_features == self.num_classes)

        ignored = [m for m in self.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and keep(m)]
        heads = transformer_heads(self.model)
        if heads is not None:  # only heads and MLP neurons: every layer writing into the residual stream is kept
            num_heads, prunable = heads
            ignored = [m for m in self.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m not in prunable]
            extra = {"num_heads": num_heads, "prune_num_heads": True, "prune_head_dims": False}
            extra["head_pruning_ratio"] = self.ratio
        pruner = tp.pruner.MetaPruner(
            self.model,
            self.example,
            importance=importance,
            pruning_ratio=self.ratio,
            ignored_layers=ignored,
            global_pruning=self.global_pruning,
            **(extra if heads is not None else {}),
        )
        pruner.step()
        if heads is not None:
            set_head_counts(self.model, pruner.num_heads)
        self.model.zero_grad(set_to_none=True)  # taylor's gradients were the calibration's, not training's

    def after_step(self, step: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def layer_sparsity(self) -> dict[str, float]:
        return {}

    def record(self) -> dict[str, Any]:
        """Per block, what hand-sliced (Llama-style) pruning left: heads, key-value heads, MLP neurons."""
        return {"width": self.sizes} if self.sizes else {}


# the MLP layers whose outputs are hidden neurons (modrun's, Llama-style gate and up)
MLP_INPUTS = ("fc", "gate_proj", "up_proj")


def transformer_heads(model: nn.Module) -> tuple[dict[nn.Module, int], list[nn.Module]] | None:
    """{head projection: its head count} and the layers whose outputs may go (head projections, MLP inputs),
    or None for a model without attention blocks."""
    num_heads: dict[nn.Module, int] = {}
    mlp: list[nn.Module] = []
    for path in getattr(model, "feature_layers", ()) or ():
        block = model.get_submodule(path)
        for m in block.modules():
            if "Attention" not in type(m).__name__:
                continue
            if isinstance(getattr(m, "qkv", None), nn.Linear):  # modrun's gpt / vit: one fused projection
                num_heads[m.qkv] = int(m.heads)
        mlp += [m for n, m in block.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in MLP_INPUTS]
    if not num_heads and any("Attention" in type(m).__name__ for m in model.modules()):
        raise UserError(f"prune=channel: the attention of {type(model).__name__} is neither modrun's (qkv) nor "
                        "Llama-style (q/k/v/o_proj, gate/up/down_proj); its heads cannot be pruned whole")  # fmt: skip
    return (num_heads, [*num_heads, *mlp]) if num_heads else None


def set_head_counts(model: nn.Module, num_heads: dict[nn.Module, int]) -> None:
    """After pruning: each attention module's head counts follow its projections (the forward reshapes by them)."""
    for m in model.modules():
        if isinstance(getattr(m, "qkv", None), nn.Linear) and m.qkv in num_heads:
            m.heads = num_heads[m.qkv]


def channel(
    ctx: PruneContext, ratio: float = 0.5, importance: str = "l1", global_pruning: bool = False, calib_batches: int = 8
) -> ChannelPruner:
    """Remove `ratio` of the output channels of every targeted layer (or globally), by weight importance."""
    if calib_batches < 1:
        raise UserError(f"prune.calib_batches={calib_batches}: must be at least 1")
    if not 0.0 < ratio < 1.0:
        raise UserError(f"prune.ratio={ratio}: must be in (0, 1)")
    if importance not in IMPORTANCE:
        raise UserError(f"prune.importance={importance}: expected one of {', '.join(IMPORTANCE)}")
    if importance == "random":
        torch.manual_seed(ctx.seed)
    return ChannelPruner(ctx, ratio, importance, global_pruning, calib_batches)
