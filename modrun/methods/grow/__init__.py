"""Model growth: make a bigger model from a trained smaller one, then train it on (`modrun grow`).

A method has two halves: `grown_node` says which registered architecture the bigger model is (so that its
run folder's config rebuilds it: eval, resume, teacher.run), `grow` fills that model's weights from the
source's. This module imports no torch; the methods' maths lives in stack.py and net2net.py.
"""

from __future__ import annotations

import math
from typing import Any

RESNETS = ("resnet", "resnet20", "resnet32", "resnet56", "resnet110")
# which registered models each method knows the structure of (by name: the grown model must be rebuildable
# from a config, so growth is defined per architecture, not for any nn.Module)
SUPPORTED = {"stack": (*RESNETS, "gpt", "vit"), "net2wider": ("cnn_small", *RESNETS)}
TRANSFORMER_DEPTH = {"gpt": ("n_layer", 4), "vit": ("depth", 6)}  # the key that counts blocks, and its default
WHY_NOT = {
    "stack": "its blocks all change the channel count, so none can be repeated",
    "net2wider": "modrun knows no Net2Net mapping for its layers",
}
# "module:function" that fills a grown model's weights from the source: fn(source, grown, grow_cfg, seed)
GROWERS = {"stack": "modrun.methods.grow.stack:stack", "net2wider": "modrun.methods.grow.net2net:net2wider"}
STAGE_CHANNELS = (16, 32, 64)  # CIFAR ResNet stage widths at width 1.0 (modrun/models/resnet.py)


def resnet_depth(node: dict[str, Any]) -> int:
    return int(node.get("depth", 20)) if node["name"] == "resnet" else int(node["name"][len("resnet") :])


def unsupported(method: str, node: dict[str, Any]) -> str | None:
    """Why `method` cannot grow the model of `node`, or None when it can."""
    if node.get("name") in SUPPORTED[method]:
        return None
    return (
        f"grow={method} cannot grow model '{node.get('name')}' ({WHY_NOT[method]}); "
        f"it supports {', '.join(SUPPORTED[method])}"
    )


def factor_problem(method: str, node: dict[str, Any], factor: Any) -> str | None:
    """Why `factor` does not work for this method and model (not a whole number where one is needed, < 1)."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor < 1:
        return f"grow.factor={factor}: must be a number >= 1"
    if method == "stack" and node.get("name") in TRANSFORMER_DEPTH and factor < 2:  # a copy of itself is no growth
        return f"grow.factor={factor}: stacking a transformer needs a whole number >= 2 (its blocks x factor)"
    if method == "stack":
        return None if float(factor).is_integer() else f"grow.factor={factor}: stacking repeats blocks, use 2, 3, ..."
    channels = _widths(node, factor)
    bad = [c for c in channels if abs(c - round(c)) > 1e-6]
    if bad:
        return (
            f"grow.factor={factor}: model '{node['name']}' at width {node.get('width')} x {factor} gives "
            f"{bad[0]:g} channels, not a whole number; pick a factor such as 2"
        )
    return None


def _widths(node: dict[str, Any], factor: float) -> list[float]:
    """The grown model's channel counts before any rounding (they must come out whole)."""
    if node["name"] == "cnn_small":
        return [float(node.get("width", 32)) * factor]  # its layers are width, 2 x width, 4 x width
    return [c * float(node.get("width", 1.0)) * factor for c in STAGE_CHANNELS]


def grown_node(method: str, node: dict[str, Any], grow_cfg: Any) -> dict[str, Any]:
    """The config node of the grown model (a registered architecture, so the run folder can rebuild it)."""
    factor = grow_cfg["factor"]
    if method == "stack" and node["name"] in TRANSFORMER_DEPTH:
        key, default = TRANSFORMER_DEPTH[node["name"]]
        return {**node, key: int(node.get(key, default)) * int(factor)}
    if method == "stack":
        blocks = (resnet_depth(node) - 2) // 6
        return {**node, "name": "resnet", "depth": 6 * blocks * int(factor) + 2}
    if node["name"] == "cnn_small":
        return {**node, "width": int(round(float(node.get("width", 32)) * factor))}
    # a ResNet's width is a multiplier: keep it short (1.0 x 1.5 = 1.5, not 1.5000000000000002)
    return {**node, "width": round(float(node.get("width", 1.0)) * factor, 10)}
