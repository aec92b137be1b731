"""The stitched networks: both anchors' stages, a stitching layer per point (a 1x1 conv between (B, C, H, W)
feature maps, a linear map of every token between (B, tokens, dim) streams), its least-squares start, the training
objective (one point per step) and the report over every point and both anchors."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modrun.components.data.base import Preprocess
from modrun.core.plots import accuracy_vs_params
from modrun.engine.evaluation import scores_and_cost
from modrun.engine.objectives import StepSeeded

# the stitching layer by the rank of the features it maps (stitch.json `layer`; runs without it are conv1x1)
LAYERS = {4: "conv1x1", 3: "linear"}


def stitch_layer(layer: str, cs: int, cl: int) -> nn.Module:
    """A 1x1 conv over the channels of every pixel, or a linear map of every token's features (cs -> cl)."""
    if layer == "conv1x1":
        return nn.Conv2d(cs, cl, 1)
    if layer == "linear":
        return nn.Linear(cs, cl)
    raise ValueError(f"unknown stitching layer '{layer}'; expected one of {', '.join(LAYERS.values())}")


class StitchNet(nn.Module):
    """Both frozen anchors and one stitching layer per point. forward(x, k) runs the small anchor's stages 0..k,
    the stitch at k, then the large anchor's stages k+1..; without k it runs `self.point` (what the loop's
    per-epoch validation and the best-checkpoint choice measure: one fixed point, for a comparable curve)."""

    def __init__(
        self,
        small: nn.Module,
        large: nn.Module,
        channels: dict[int, tuple[int, int]],
        point: int,
        layer: str = "conv1x1",
    ) -> None:
        super().__init__()
        self.small, self.large = small.eval().requires_grad_(False), large.eval().requires_grad_(False)
        self.stitches = nn.ModuleDict({str(k): stitch_layer(layer, cs, cl) for k, (cs, cl) in channels.items()})
        self.point, self.layer = point, layer

    def train(self, mode: bool = True) -> StitchNet:
        super().train(mode)
        self.small.eval(), self.large.eval()  # frozen anchors: BatchNorm statistics and dropout stay as trained
        return self

    def stitched(self, k: int) -> nn.Sequential:
        """The stitched model at point k as one module (it shares the anchors' and the stitch's weights)."""
        return nn.Sequential(*self.small.stages()[: k + 1], self.stitches[str(k)], *self.large.stages()[k + 1 :])

    def forward(self, x: torch.Tensor, point: int | None = None) -> torch.Tensor:
        return self.stitched(self.point if point is None else point)(x)


@torch.no_grad()
def boundary_features(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The output of every stage but the head (the tensors a stitch reads or must reproduce)."""
    was = model.training
    model.eval()
    feats = []
    for stage in model.stages()[:-1]:
        x = stage(x)
        feats.append(x)
    model.train(was)
    return feats


def rows(f: torch.Tensor) -> torch.Tensor:
    """Features as (N, channels) rows: one per pixel of (B, C, H, W) maps, one per token of (B, tokens, dim)
    streams, (N, C) as it is."""
    if f.dim() == 4:
        return f.movedim(1, -1).reshape(-1, f.shape[1])
    if f.dim() in (2, 3):
        return f.reshape(-1, f.shape[-1])
    raise ValueError(f"cannot stitch features of shape {tuple(f.shape)}: expected (B, C, H, W) or (B, tokens, dim)")


def least_squares(fs: torch.Tensor, fl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W, b minimising ||[f_s, 1] W - f_l||^2 over every row (`rows`: every pixel or token of every sample), as
    the stitching layer's weight (a 1x1 conv's for 4-d features, a linear layer's otherwise) and bias. Float64 on
    the CPU: post-ReLU features often have dead channels, and gelsd gives the minimum-norm solution regardless."""
    a, b = rows(fs).double().cpu(), rows(fl).double().cpu()
    a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
    sol = torch.linalg.lstsq(a, b, driver="gelsd").solution  # (cs + 1, cl)
    w = sol[:-1].T  # (cl, cs)
    return (w.reshape(*w.shape, 1, 1) if fs.dim() == 4 else w).float(), sol[-1].float()


def build(small: nn.Module, large: nn.Module, points: list[int], x: torch.Tensor) -> StitchNet:
    """The stitch net with every stitching layer fitted by least squares on the batch `x` (preprocessed)."""
    fs, fl = boundary_features(small, x), boundary_features(large, x)
    for k in points:  # all but the channels must agree: the pixels of a map, the tokens of a stream
        if fs[k].dim() not in LAYERS or fs[k].dim() != fl[k].dim() or _places(fs[k]) != _places(fl[k]):
            raise ValueError(f"stitch point {k}: features {tuple(fs[k].shape)} vs {tuple(fl[k].shape)}")
    channels = {k: (rows(fs[k]).shape[1], rows(fl[k]).shape[1]) for k in points}
    net = StitchNet(small, large, channels, points[len(points) // 2], LAYERS[fs[points[0]].dim()])
    with torch.no_grad():
        for k in points:
            w, b = least_squares(fs[k], fl[k])
            stitch = net.stitches[str(k)]
            stitch.weight.copy_(w), stitch.bias.copy_(b)
    return net.to(x.device)


def _places(f: torch.Tensor) -> tuple[int, ...]:
    """The shape of features without their channels: (B, H, W) of a map, (B, tokens) of a token stream."""
    return (f.shape[0], *f.shape[2:]) if f.dim() == 4 else tuple(f.shape[:-1])


class StitchObjective(StepSeeded):
    """Cross-entropy of one stitch point per step, drawn from a generator seeded by (seed, step): resumable."""

    def __init__(self, net: StitchNet, points: list[int], seed: int) -> None:
        super().__init__(net)
        self.points, self.seed, self.step = points, seed, 0

    def loss(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.step)
        k = self.points[int(torch.randint(len(self.points), (1,), generator=gen))]
        logits = self.model(x, point=k)
        return F.cross_entropy(logits, y), logits, {}


def report(net: StitchNet, points: list[int], data: Any, device: torch.device, batch_size: int) -> list[dict]:
    """Accuracy, parameters (of the modules a model actually uses), MACs and batch-1 latency of both anchors and
    every stitch point, fewest parameters first."""

    prep = Preprocess(data, device)
    models = [("small", None, net.small), ("large", None, net.large)]
    models += [(f"stitch@{k}", k, net.stitched(k)) for k in points]
    rows = []
    for name, k, model in models:
        model.eval()  # a fresh Sequential starts in train mode, and cost.* restores the mode it finds
        rows.append({"model": name, "point": k, **scores_and_cost(model, data, prep, batch_size, device)})
    net.train(net.training)
    return sorted(rows, key=lambda r: (r["params"], r["model"]))


def plot(rows: list[dict[str, Any]], path: Any) -> bool:
    """Test accuracy against parameters: the stitched models as a line, the anchors also as stars."""

    anchors = tuple(i for i, r in enumerate(rows) if r["point"] is None)
    return accuracy_vs_params(rows, [r["model"] for r in rows], path, "stitchable network", anchors)
