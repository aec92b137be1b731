"""Structured pruning changes layer shapes. A run folder records them in `model_shapes.json` beside
`model.safetensors`, so the smaller model is rebuilt from its registered architecture without pickles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from modrun.components.models.stages import Passthrough, PrefixLinear, ZeroBranch

SHAPES_FILE = "model_shapes.json"
# head counts of attention modules (modrun's, Hugging Face's) that structured pruning of whole heads changes
HEAD_ATTRIBUTES = ("heads", "num_heads", "num_key_value_heads", "num_key_value_groups")


def layer_shapes(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The channel counts of every conv, linear and batch-norm layer; the blocks and branches depth pruning removed."""
    shapes: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            shapes[name] = {
                "type": "Conv2d",
                "in_channels": m.in_channels,
                "out_channels": m.out_channels,
                "groups": m.groups,
            }
        elif isinstance(m, nn.Linear):
            kind = type(m).__name__ if isinstance(m, PrefixLinear) else "Linear"
            shapes[name] = {"type": kind, "in_features": m.in_features, "out_features": m.out_features}
        elif isinstance(m, nn.BatchNorm2d):
            shapes[name] = {"type": "BatchNorm2d", "num_features": m.num_features}
        elif "Attention" in type(m).__name__ and any(isinstance(getattr(m, a, None), int) for a in HEAD_ATTRIBUTES):
            shapes[name] = {"type": "Attention", **{a: getattr(m, a) for a in HEAD_ATTRIBUTES if hasattr(m, a)}}
        elif isinstance(m, Passthrough):
            shapes[name] = {"type": "Passthrough"}
        elif isinstance(m, ZeroBranch):
            shapes[name] = {"type": "ZeroBranch", "pair": m.pair}
    return shapes


def changed_shapes(dense: dict[str, dict], pruned: dict[str, dict]) -> dict[str, dict]:
    return {name: s for name, s in pruned.items() if dense.get(name) != s}


def apply_shapes(model: nn.Module, shapes: dict[str, dict[str, Any]]) -> nn.Module:
    """Replace the layers named in `shapes` with fresh ones of the recorded sizes (weights are loaded after)."""
    for name, s in shapes.items():
        old = model.get_submodule(name)
        if s["type"] == "Attention":  # the module stays; its head counts follow its pruned projections
            for key, value in s.items():
                if key != "type" and (key not in HEAD_ATTRIBUTES or not hasattr(old, key) or type(value) is not int):
                    raise ValueError(f"{SHAPES_FILE}: {name}.{key}={value!r} is not a head count of that module")
                if key != "type":
                    setattr(old, key, value)
            continue
        if s["type"] == "Conv2d":
            new = nn.Conv2d(
                s["in_channels"],
                s["out_channels"],
                old.kernel_size,
                old.stride,
                old.padding,
                old.dilation,
                s["groups"],
                old.bias is not None,
                old.padding_mode,
            )
        elif s["type"] in ("Linear", "PrefixLinear"):
            kind = PrefixLinear if s["type"] == "PrefixLinear" else nn.Linear
            new = kind(s["in_features"], s["out_features"], old.bias is not None)
        elif s["type"] == "BatchNorm2d":
            new = nn.BatchNorm2d(s["num_features"], old.eps, old.momentum, old.affine, old.track_running_stats)
        elif s["type"] == "Passthrough":
            new = Passthrough()
        elif s["type"] == "ZeroBranch":
            new = ZeroBranch(bool(s.get("pair", False)))
        else:
            raise ValueError(f"{SHAPES_FILE}: unknown layer type {s['type']} at {name}")
        model.set_submodule(name, new.to(next(old.parameters(), None).device if list(old.parameters()) else "cpu"))
    return model


def read_shapes(run_dir: Path) -> dict[str, dict[str, Any]] | None:
    path = Path(run_dir) / SHAPES_FILE
    return json.loads(path.read_text()) if path.exists() else None
