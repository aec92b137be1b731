"""How several task vectors (tau_i = theta_i - theta_base, one dict of float tensors per fine-tuned run)
become one, and how deep layers are scaled.

- `task_arithmetic` (Ilharco et al. 2023): their sum.
- `ties` (Yadav et al. 2023, "TIES-Merging"): trim each task vector to its `density` largest magnitudes (over
  the whole vector, as the paper's code does, not per tensor), elect each entry's sign as that of the trimmed
  vectors' sum, and average only the entries that agree with it (the disjoint mean).
- `dare` (Yu et al. 2024, "Language Models are Super Mario"): drop each entry of each task vector with
  probability `drop_rate` and rescale the rest by 1 / (1 - drop_rate), seeded; then sum them.
- LiNeS (Wang et al. 2025, "LiNeS: post-training layer scaling"): the merged vector of block l of L is scaled
  by alpha + beta (l - 1) / (L - 1); weights before the first block (embeddings) count as block 1, those after
  the last (final norm, head) as block L.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Vector = dict[str, torch.Tensor]


def task_vectors(base: Vector, states: list[Vector]) -> list[Vector]:
    return [{k: s[k].float() - b.float() for k, b in base.items() if b.is_floating_point()} for s in states]


def task_arithmetic(taus: list[Vector]) -> Vector:
    return {k: torch.stack([t[k] for t in taus]).sum(0) for k in taus[0]}


def trim(tau: Vector, density: float) -> Vector:
    """The `density` fraction of entries of largest magnitude over the whole task vector; the rest set to 0."""
    flat = torch.cat([v.reshape(-1) for v in tau.values()])
    keep = max(1, int(flat.numel() * density))
    if keep >= flat.numel():
        return dict(tau)
    threshold = flat.abs().topk(keep).values[-1]  # ties at the threshold are kept, as in the paper's code
    return {k: torch.where(v.abs() >= threshold, v, torch.zeros_like(v)) for k, v in tau.items()}


def ties(taus: list[Vector], density: float) -> Vector:
    trimmed = [trim(t, density) for t in taus]
    out = {}
    for k in taus[0]:
        stacked = torch.stack([t[k] for t in trimmed])
        sign = torch.sign(stacked.sum(0))  # the elected sign: that of the larger total mass
        agree = (torch.sign(stacked) == sign) & (stacked != 0)
        out[k] = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
    return out


def dare(taus: list[Vector], drop_rate: float, seed: int) -> Vector:
    """Drop-and-rescale each task vector (masks drawn on the CPU from `seed`: the same on every device), summed."""
    gen = torch.Generator().manual_seed(seed)
    rescaled = []
    for tau in taus:
        kept = {}
        for k, v in tau.items():
            keep = torch.rand(v.shape, generator=gen) >= drop_rate
            kept[k] = torch.where(keep.to(v.device), v / (1.0 - drop_rate), torch.zeros_like(v))
        rescaled.append(kept)
    return task_arithmetic(rescaled)


def lines_scale(keys: list[str], blocks: tuple[str, ...], alpha: float, beta: float) -> Callable[[str], float]:
    """LiNeS: the scale of each state-dict key by the depth of the block holding it (`blocks` in order)."""
    depth: dict[str, int] = {}
    seen_a_block = False
    for key in keys:  # in the model's state-dict order (not a file's sorted one): before the first block is its input
        own = next((i for i, b in enumerate(blocks) if key.startswith(b + ".")), None)
        seen_a_block = seen_a_block or own is not None
        depth[key] = own if own is not None else (len(blocks) - 1 if seen_a_block else 0)
    span = max(len(blocks) - 1, 1)  # one block: every key gets alpha
    return lambda key: alpha + beta * depth.get(key, 0) / span
