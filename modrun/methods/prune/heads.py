"""Whole-head and MLP-neuron pruning of Llama-style blocks (Hugging Face Llama, Mistral, Qwen2: separate
q/k/v/o projections, grouped-query attention, gated MLP), sliced by hand.

Torch-Pruning's dependency graph does not finish tracing these models (transformers 5's attention and rotary
code), and their structure needs no tracing: a block's attention is q/k/v rows and o columns grouped by
key-value head, its MLP is gate/up rows and down columns. A key-value group (one k and v head with the
q heads that read it) is the unit removed from attention, so every kept query head still finds its key and
value head and `num_key_value_groups` stays as it was; an MLP neuron is one gate row, one up row and one down
column. A unit's importance is the l1 or l2 norm of all the weights it owns (as Torch-Pruning's
MagnitudeImportance over a group, summed), or for `taylor` the sum of |w x dL/dw| over them (Molchanov et al.
2019, as Torch-Pruning's TaylorImportance summed over the group); the residual width, embeddings, norms and
head never change."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from modrun.core.errors import UserError

HF_FOLDER = "hf_model"  # in a prune run folder: config.json and safetensors that transformers loads as they are


def llama_blocks(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(attention, mlp) of every block of a Llama-style model; [] for any other model."""
    pairs = []
    for path in getattr(model, "feature_layers", ()) or ():
        block = model.get_submodule(path)
        attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
        if all(isinstance(getattr(attn, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            if all(isinstance(getattr(mlp, p, None), nn.Linear) for p in ("gate_proj", "up_proj", "down_proj")):
                pairs.append((attn, mlp))
    return pairs


def _norm(weights: list[torch.Tensor], dim: int, p: int) -> torch.Tensor:
    """Per unit (along `dim` after the reshape each caller did), the p-norm over every weight the unit owns."""
    total = sum(w.abs().sum(dim) if p == 1 else w.pow(2).sum(dim) for w in weights)
    return total if p == 1 else total.sqrt()


def _weight(layer: nn.Linear, taylor: bool) -> torch.Tensor:
    """What a unit's score sums: the weights, or (taylor) each weight times its loss gradient."""
    return layer.weight * layer.weight.grad if taylor else layer.weight


def group_scores(attn: nn.Module, p: int, taylor: bool = False) -> torch.Tensor:
    """One score per key-value group: its q, k, v rows and its o columns."""
    d, kv = int(attn.head_dim), attn.k_proj.out_features // int(attn.head_dim)
    q = _weight(attn.q_proj, taylor).reshape(kv, -1, attn.q_proj.in_features)  # (groups, g*d, hidden)
    k = _weight(attn.k_proj, taylor).reshape(kv, d, -1)
    v = _weight(attn.v_proj, taylor).reshape(kv, d, -1)
    o = _weight(attn.o_proj, taylor).reshape(attn.o_proj.out_features, kv, -1).transpose(0, 1)  # (groups, hidden, g*d)
    return _norm([w.reshape(kv, -1) for w in (q, k, v, o)], 1, p)


def neuron_scores(mlp: nn.Module, p: int, taylor: bool = False) -> torch.Tensor:
    layers = (_weight(mlp.gate_proj, taylor), _weight(mlp.up_proj, taylor), _weight(mlp.down_proj, taylor).t())
    return _norm(list(layers), 1, p)


def _linear(w: torch.Tensor, b: torch.Tensor | None) -> nn.Linear:
    new = nn.Linear(w.shape[1], w.shape[0], b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new


def _rows(layer: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    return _linear(layer.weight[keep], None if layer.bias is None else layer.bias[keep])


def _cols(layer: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    return _linear(layer.weight[:, keep], layer.bias)


@torch.no_grad()
def keep_groups(attn: nn.Module, groups: torch.Tensor) -> None:
    """Keep only the key-value groups `groups` (sorted indices) of one attention module."""
    d, kv = int(attn.head_dim), attn.k_proj.out_features // int(attn.head_dim)
    g = attn.q_proj.out_features // (kv * d)
    kv_rows = (groups[:, None] * d + torch.arange(d)).flatten()
    q_rows = (groups[:, None] * g * d + torch.arange(g * d)).flatten()
    attn.q_proj, attn.o_proj = _rows(attn.q_proj, q_rows), _cols(attn.o_proj, q_rows)
    attn.k_proj, attn.v_proj = _rows(attn.k_proj, kv_rows), _rows(attn.v_proj, kv_rows)


@torch.no_grad()
def keep_neurons(mlp: nn.Module, neurons: torch.Tensor) -> None:
    mlp.gate_proj, mlp.up_proj = _rows(mlp.gate_proj, neurons), _rows(mlp.up_proj, neurons)
    mlp.down_proj = _cols(mlp.down_proj, neurons)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(neurons)


def _choose(scores: list[torch.Tensor], ratio: float, global_pruning: bool, what: str) -> list[torch.Tensor]:
    """Sorted kept indices per layer: the highest-scoring (1 - ratio) of each layer, or of all layers together
    (each score divided by its layer's mean first, so layers of different scale compete fairly) with at least
    one unit left in every layer."""
    sizes = [len(s) for s in scores]
    remove = [int(n * ratio + 1e-9) for n in sizes]
    if not any(remove):
        least = 1 / min(sizes)
        raise UserError(f"prune.ratio={ratio}: removes no {what} of {min(sizes)}; use a ratio of at least {least:g}")
    if global_pruning:
        flat = torch.cat([s / s.mean().clamp_min(1e-12) for s in scores])
        order = flat.argsort()[: sum(remove)]
        owner = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        remove = [int((owner[order] == i).sum()) for i in range(len(sizes))]
        remove = [min(r, n - 1) for r, n in zip(remove, sizes, strict=True)]
    return [s.argsort(descending=True)[: n - r].sort().values for s, n, r in zip(scores, sizes, remove, strict=True)]


def prune_llama(
    blocks: list[tuple[nn.Module, nn.Module]], ratio: float, importance: str, global_pruning: bool, seed: int
) -> dict[str, Any]:
    """Remove `ratio` of the key-value groups and of the MLP neurons of every block; say what is left."""
    if importance == "random":
        gen = torch.Generator().manual_seed(seed)
        group = [torch.rand(a.k_proj.out_features // int(a.head_dim), generator=gen) for a, _ in blocks]
        neuron = [torch.rand(m.up_proj.out_features, generator=gen) for _, m in blocks]
    else:  # taylor: the l1 norm of w x dL/dw; group_l2 is l2 (a unit's weights are one group here)
        p, taylor = (1 if importance in ("l1", "taylor") else 2), importance == "taylor"
        group = [group_scores(a, p, taylor) for a, _ in blocks]
        neuron = [neuron_scores(m, p, taylor) for _, m in blocks]
    for (attn, mlp), groups, neurons in zip(
        blocks,
        _choose(group, ratio, global_pruning, "key-value group"),
        _choose(neuron, ratio, global_pruning, "MLP neuron"),
        strict=True,
    ):
        keep_groups(attn, groups)
        keep_neurons(mlp, neurons)
    return {
        "heads": [a.q_proj.out_features // int(a.head_dim) for a, _ in blocks],
        "key_value_heads": [a.k_proj.out_features // int(a.head_dim) for a, _ in blocks],
        "intermediate": [m.up_proj.out_features for _, m in blocks],
    }


def rewrite_config(config: Any, sizes: dict[str, list[int]], head_dim: int) -> bool:
    """The Hugging Face config of a model pruned the same in every block (False, unchanged, otherwise)."""
    if any(len(set(v)) != 1 for v in sizes.values()):
        return False
    config.num_attention_heads, config.num_key_value_heads = sizes["heads"][0], sizes["key_value_heads"][0]
    config.intermediate_size, config.head_dim = sizes["intermediate"][0], head_dim
    return True
