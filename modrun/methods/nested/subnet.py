"""Cutting the sizes of a nested run (modrun/nested.py) out as physically smaller models, and reporting them.

A `sorted` size (width, depth) keeps the leading channels of every layer and the leading blocks of every
residual stage; a `matryoshka` size (dim) keeps the first `dim` inputs of the classifier `fc` (a PrefixLinear,
which reads the first `dim` features of the embedding), and also the first `dim` outputs of the layers that make
the embedding channel for channel (a model's `embedding_producers`, e.g. cnn_small's last conv and its BN), so
a cut model computes exactly the prefix logits it was trained for. Each is saved as model.safetensors +
model_shapes.json (as pruned models are) + model.yaml (the architecture to build first).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save
from torch import nn

from modrun.components.build import build_model
from modrun.components.data.base import Preprocess, batches
from modrun.components.shapes import SHAPES_FILE, apply_shapes, read_shapes
from modrun.core.plots import accuracy_vs_params
from modrun.core.runfolder import atomic_write, write_json
from modrun.engine.evaluation import scores_and_cost
from modrun.methods.nested.base import Exit, Size, block_stages, classifier, keep, keep_blocks, size_name, sizes
from modrun.methods.nested.exits import cut_exit, exit_blocks

MODEL_FILE = "model.yaml"


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


def prefix_shapes(model: nn.Module, dim: int) -> dict[str, dict[str, Any]]:
    """Layer sizes of the matryoshka model of `dim`: the classifier and the embedding's producers cut to dim."""
    fc = classifier(model)
    shapes: dict[str, dict[str, Any]] = {
        "fc": {"type": "PrefixLinear", "in_features": dim, "out_features": fc.out_features}
    }
    for name in getattr(model, "embedding_producers", ()):
        m = model.get_submodule(name)
        if isinstance(m, nn.Conv2d):
            shapes[name] = {"type": "Conv2d", "in_channels": m.in_channels, "out_channels": dim, "groups": m.groups}
        elif isinstance(m, nn.BatchNorm2d):
            shapes[name] = {"type": "BatchNorm2d", "num_features": dim}
    return shapes


def shorten(model: nn.Module, depth: float) -> nn.Module:
    """Drop the trailing blocks of every residual stage (in place)."""
    if depth < 1.0:
        for stage in block_stages(model):
            del stage[keep_blocks(len(stage), depth) :]
    return model


def cut(model: nn.Module, size: Size, in_channels: int) -> tuple[nn.Module, dict[str, dict[str, Any]]]:
    """A physically smaller copy of one size, holding the leading slices of every weight, and its shapes (an
    exit's are none: its layers keep their sizes, there are only fewer blocks)."""
    if isinstance(size, Exit):
        return cut_exit(model, size.blocks), {}
    small = copy.deepcopy(model)
    if isinstance(size, tuple):
        shorten(small, size[1])
        shapes = sliced_shapes(small, size[0], in_channels)
    else:
        shapes = prefix_shapes(small, int(size))
    apply_shapes(small, shapes).train(model.training)  # new layers start in train mode
    full, state = model.state_dict(), {}
    for key, target in small.state_dict().items():
        value = full[key]
        state[key] = value[tuple(slice(0, n) for n in target.shape)].clone() if value.dim() else value.clone()
    small.load_state_dict(state)
    return small, shapes


def extract(model: nn.Module, width: float, in_channels: int, depth: float = 1.0) -> tuple[nn.Module, dict]:
    """The sub-network of `width` and `depth` of a sorted nested model (see `cut`)."""
    return cut(model, (float(width), float(depth)), in_channels)


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


def calibration_batches(data: Any, prep: Any, batch_size: int, count: int = 20) -> list[torch.Tensor]:
    """The first `count` training batches of a fixed order, without augmentation: the same every time."""

    out = []
    for x, _, _ in batches(data.train, batch_size, seed=0, epoch=0, shuffle=True, device=prep.device):
        out.append(prep(x))
        if len(out) == count:
            break
    return out


def size_model(model: nn.Module, size: Size, data: Any, prep: Any, bs: int) -> tuple[nn.Module, dict]:
    """The deployable model of one size and its shapes: cut out; a sorted one's BatchNorm statistics recomputed
    (the shared ones mix every size), a matryoshka one's kept (its backbone is the full model's)."""
    small, shapes = cut(model, size, data.channels)
    if isinstance(size, tuple):
        recalibrate(small, calibration_batches(data, prep, bs))
    return small, shapes


def size_row(size: Size) -> dict[str, Any]:
    if isinstance(size, Exit):
        return {"exit": size.blocks}
    return {"width": size[0], "depth": size[1]} if isinstance(size, tuple) else {"dim": size}


def offered(node: DictConfig, model: nn.Module) -> list[Size]:
    """The sizes of a nested run of this model (exits count its blocks)."""
    return sizes(node, len(exit_blocks(model)) if node.name == "exits" else None)


def report(cfg: DictConfig, model: nn.Module, data: Any, device: torch.device) -> list[dict[str, Any]]:
    """The task's metrics, parameters, MACs and latency of every size of a nested run, in the order of `sizes`."""

    prep, bs = Preprocess(data, device), int(cfg.data.eval_batch_size)
    rows = []
    for size in offered(cfg.nested, model):
        sub, _ = size_model(model, size, data, prep, int(cfg.data.batch_size))
        rows.append({**size_row(size), **scores_and_cost(sub, data, prep, bs, device)})
    return rows


def label(row: dict[str, Any]) -> str:
    if "exit" in row:
        return f"exit {row['exit']}"
    if "dim" in row:
        return f"dim {row['dim']}"
    return f"w {row['width']:g}" + (f" d {row['depth']:g}" if row["depth"] < 1 else "")


def plot(rows: list[dict[str, Any]], path: Any) -> bool:
    """The test metric against parameters, one point per size (matplotlib is optional)."""

    return accuracy_vs_params(rows, [label(r) for r in rows], path, "nested sub-networks")


def architecture(cfg: DictConfig, model: nn.Module, size: Size) -> dict[str, Any]:
    """The model config to build before the shapes are applied: a shallower size is a model of fewer blocks."""
    arch = OmegaConf.to_container(cfg.model, resolve=True)
    if isinstance(size, Exit):
        arch[model.depth_key] = size.blocks
    if isinstance(size, tuple) and size[1] < 1.0:
        arch.update(model.depth_config(keep_blocks(len(block_stages(model)[0]), size[1])))
    return arch


def export(
    run_dir: Path, cfg: DictConfig, model: nn.Module, size: Size, data: Any, prep: Any, weights: str = "final"
) -> nn.Module:
    """The model of one size, ready to evaluate, also saved under nested/<size>/ (nested/<size>_<weights> for
    the best or last checkpoint's weights) so it deploys on its own."""

    sub, shapes = size_model(model, size, data, prep, int(cfg.data.batch_size))
    folder = Path(run_dir) / "nested" / (size_name(size) + ("" if weights == "final" else f"_{weights}"))
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(
        folder / "model.safetensors", save({k: v.detach().cpu().contiguous() for k, v in sub.state_dict().items()})
    )
    if shapes:  # an exit has none: the same layers, fewer blocks (model.yaml says how many)
        write_json(folder / SHAPES_FILE, shapes)
    atomic_write(folder / MODEL_FILE, OmegaConf.to_yaml(architecture(cfg, model, size)))
    return sub


def load(folder: Path) -> nn.Module:
    """A saved size (nested/<size>/) as a model of its own: build model.yaml, apply the shapes, load weights."""

    folder = Path(folder)
    model = build_model(OmegaConf.load(folder / MODEL_FILE))
    apply_shapes(model, read_shapes(folder) or {})
    model.load_state_dict(load_file(folder / "model.safetensors"))
    return model.eval()
