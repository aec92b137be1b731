"""Nested sub-networks trained in one run (`nested` group): many deployable sizes from one set of weights.

`sorted` (SortedNet, Valipour et al. 2023; after slimmable networks, Yu et al. 2019): a sub-network of width
w keeps the leading ceil(w * C) channels of every layer with C channels. Training masks the other channels
at every BatchNorm output (so a narrower network sees exactly the activations its sliced copy would) and
adds up, per step, the losses of all widths (`mode: sum`) or of the full width plus one width drawn from a
generator seeded by the step (`mode: sample`, resumable); `kd_weight` > 0 adds in-place distillation from
the full width's detached logits (Hinton KD). A sub-network is then cut out as a physically smaller model
and its BatchNorm statistics are recomputed on training batches, since the shared ones mix every width.

`matryoshka` (Matryoshka representation learning, Kusupati et al. 2022): the classifier is trained on nested
prefixes of the embedding (the input of the final linear layer): loss = mean over dims d of
CE(W[:, :d] x[:, :d] + b).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from modrun.errors import UserError
from modrun.objectives import StepSeeded


def keep(channels: int, width: float) -> int:
    return max(1, math.ceil(width * channels - 1e-9))


@contextmanager
def slim(model: nn.Module, width: float) -> Iterator[None]:
    """Run `model` as its sub-network of `width`: channels beyond the leading ones are zero after each BN."""
    if width >= 1.0:
        yield
        return

    def mask(module: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        k = keep(out.shape[1], width)
        m = torch.zeros(out.shape[1], device=out.device, dtype=out.dtype)
        m[:k] = 1
        return out * m.view(1, -1, *([1] * (out.dim() - 2)))

    handles = [m.register_forward_hook(mask) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def check(cfg: DictConfig, model: nn.Module) -> None:
    node = cfg.nested
    if node.name == "sorted":
        widths = list(node.widths)
        if not widths or any(not 0 < float(w) <= 1 for w in widths):
            raise UserError(f"nested.widths={widths}: each width must be in (0, 1]")
        if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
            raise UserError(f"nested=sorted slices channels at BatchNorm layers; model {cfg.model.name} has none")
    elif node.name == "matryoshka":
        fc = classifier(model)
        dims = list(node.dims)
        if not dims or any(not 0 < int(d) <= fc.in_features for d in dims):
            raise UserError(f"nested.dims={dims}: each must be in 1..{fc.in_features} (the embedding size)")


def classifier(model: nn.Module) -> nn.Linear:
    fc = getattr(model, "fc", None)
    if not isinstance(fc, nn.Linear):
        raise UserError("nested=matryoshka needs a model whose classifier is a linear layer named `fc`")
    return fc


def sizes(node: DictConfig) -> list[float]:
    """The sizes a nested run offers, smallest first: widths (sorted) or dims (matryoshka)."""
    if node.name == "sorted":
        return sorted({float(w) for w in node.widths} | {1.0})  # the full model is always one of them
    return sorted({int(d) for d in node.dims})


class NestedObjective(StepSeeded):
    """The loss over every size of a nested run; the logits reported are the full model's."""

    def __init__(self, model: nn.Module, node: DictConfig, seed: int) -> None:
        super().__init__(model)
        self.node, self.seed, self.step = node, seed, 0
        self.sizes = sizes(node)

    def loss(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        if self.node.name == "matryoshka":
            return self._matryoshka(x, y)
        widths = self.sizes[::-1]  # the full width first: its logits teach the others
        if self.node.mode == "sample" and len(widths) > 2:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.step)  # resumable: a function of the step
            widths = [widths[0], widths[1 + int(torch.randint(len(widths) - 1, (1,), generator=gen))]]
        full, total, terms = None, 0.0, {}
        for w in widths:
            with slim(self.model, w):
                logits = self.model(x)
            ce = F.cross_entropy(logits, y)
            term = ce
            if full is not None and float(self.node.kd_weight) > 0:
                from modrun.distill.methods_logit import soft_kl

                term = ce + float(self.node.kd_weight) * soft_kl(logits, full.detach(), float(self.node.temperature))
            full = logits if full is None else full
            terms[f"ce_w{w:g}"] = ce.detach()
            total = total + term
        return total / len(widths), full, terms

    def _matryoshka(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        fc, feats = classifier(self.model), {}
        handle = fc.register_forward_pre_hook(lambda m, inputs: feats.update(x=inputs[0]))
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        total, terms = 0.0, {}
        for d in self.sizes:
            ce = F.cross_entropy(prefix_logits(fc, feats["x"], d), y)
            terms[f"ce_d{d}"] = ce.detach()
            total = total + ce
        return total / len(self.sizes), logits, terms


def prefix_logits(fc: nn.Linear, x: torch.Tensor, d: int) -> torch.Tensor:
    return F.linear(x[:, :d], fc.weight[:, :d], fc.bias)


def sliced_shapes(model: nn.Module, width: float, in_channels: int) -> dict[str, dict[str, Any]]:
    """Layer sizes of the sub-network of `width` (the format of model_shapes.json). The first conv keeps the
    data's channels; every other layer keeps the leading share of its channels, so sizes match across adds."""
    shapes, first = {}, True
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            cin = m.in_channels if first else keep(m.in_channels, width)
            first = False
            shapes[name] = {
                "type": "Conv2d",
                "in_channels": cin,
                "out_channels": keep(m.out_channels, width),
                "groups": 1,
            }
        elif isinstance(m, nn.BatchNorm2d):
            shapes[name] = {"type": "BatchNorm2d", "num_features": keep(m.num_features, width)}
        elif isinstance(m, nn.Linear):  # the classifier reads pooled channels; its classes stay
            shapes[name] = {"type": "Linear", "in_features": keep(m.in_features, width), "out_features": m.out_features}
    return shapes


def extract(model: nn.Module, width: float, in_channels: int) -> tuple[nn.Module, dict[str, dict[str, Any]]]:
    """A physically smaller copy of the sub-network of `width`, with the leading slices of every weight."""
    import copy

    from modrun.prune.shapes import apply_shapes

    shapes = sliced_shapes(model, width, in_channels)
    small = apply_shapes(copy.deepcopy(model), shapes).train(model.training)  # new layers start in train mode
    state = {}
    for key, value in model.state_dict().items():
        target = small.state_dict()[key]
        state[key] = value[tuple(slice(0, n) for n in target.shape)].clone() if value.dim() else value.clone()
    small.load_state_dict(state)
    return small, shapes


@torch.no_grad()
def recalibrate(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """BatchNorm statistics measured anew on these batches (cumulative average), the sub-network's own."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    was = model.training
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    for x in batches:
        model(x)
    model.train(was)


class Prefix(nn.Module):
    """A matryoshka model that classifies from the first `dim` features of its embedding."""

    def __init__(self, model: nn.Module, dim: int) -> None:
        super().__init__()
        self.model, self.dim = model, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc, feats = classifier(self.model), {}
        handle = fc.register_forward_pre_hook(lambda m, inputs: feats.update(x=inputs[0]))
        try:
            self.model(x)
        finally:
            handle.remove()
        return prefix_logits(fc, feats["x"], self.dim)


def calibration_batches(data: Any, prep: Any, batch_size: int, count: int = 20) -> list[torch.Tensor]:
    """The first `count` training batches of a fixed order, without augmentation: the same every time."""
    from modrun.data.base import batches

    out = []
    for x, _, _ in batches(data.train, batch_size, seed=0, epoch=0, shuffle=True, device=prep.device):
        out.append(prep(x))
        if len(out) == count:
            break
    return out


def size_model(model: nn.Module, node: DictConfig, size: float, data: Any, prep: Any, bs: int) -> nn.Module:
    """The deployable model of one size: cut out and recalibrated (sorted), or reading a prefix (matryoshka)."""
    if node.name == "matryoshka":
        return Prefix(model, int(size))
    small, _ = extract(model, float(size), data.channels)
    recalibrate(small, calibration_batches(data, prep, bs))
    return small


def report(cfg: DictConfig, model: nn.Module, data: Any, device: torch.device) -> list[dict[str, Any]]:
    """Accuracy, parameters, MACs and latency of every size of a nested run, smallest first."""
    from modrun import cost
    from modrun.data.base import Preprocess
    from modrun.loop import evaluate

    prep, bs, rows = Preprocess(data, device), int(cfg.data.eval_batch_size), []
    example = torch.zeros(1, data.channels, data.image_size, data.image_size, device=device)
    for size in sizes(cfg.nested):
        sub = size_model(model, cfg.nested, size, data, prep, int(cfg.data.batch_size))
        row: dict[str, Any] = {"width" if cfg.nested.name == "sorted" else "dim": size}
        for split in ("val", "test"):
            row[f"{split}/top1"] = evaluate(sub, getattr(data, split), prep, bs, device)["top1"]
        params = cost.count_params(sub.model if isinstance(sub, Prefix) else sub)["params"]
        if isinstance(sub, Prefix):  # the classifier weights beyond the prefix are not used
            params -= (sub.model.fc.in_features - sub.dim) * sub.model.fc.out_features
        row.update(params=params, macs=cost.count_macs(sub, example), latency_ms_batch1=cost.latency_ms(sub, example))
        rows.append(row)
    return rows


def plot(rows: list[dict[str, Any]], path: Any) -> bool:
    """Test accuracy against parameters, one point per size (matplotlib is optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    key = "width" if "width" in rows[0] else "dim"
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["params"] for r in rows], [r["test/top1"] for r in rows], "o-")
    for r in rows:
        ax.annotate(f"{key} {r[key]:g}", (r["params"], r["test/top1"]), fontsize=8)
    ax.set(xlabel="parameters", ylabel="test top-1 (%)", title="nested sub-networks")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def export(run_dir: Any, model: nn.Module, node: DictConfig, size: float, data: Any, prep: Any, bs: int) -> nn.Module:
    """The model of one size, ready to evaluate; a width is also saved under nested/width_<w>/ (safetensors and
    model_shapes.json, as pruned models are), so it can be deployed on its own."""
    from pathlib import Path

    from safetensors.torch import save

    from modrun.prune.shapes import SHAPES_FILE
    from modrun.runs import atomic_write, write_json

    sub = size_model(model, node, size, data, prep, bs)
    if node.name == "sorted":
        folder = Path(run_dir) / "nested" / f"width_{size:g}"
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(
            folder / "model.safetensors", save({k: v.detach().cpu().contiguous() for k, v in sub.state_dict().items()})
        )
        write_json(folder / SHAPES_FILE, sliced_shapes(model, size, data.channels))
    return sub
