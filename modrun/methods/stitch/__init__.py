"""Stitchable networks (SN-Net, Pan et al. 2023): two trained anchors of one family and different sizes, joined
at a stage boundary by a trainable layer (a 1x1 convolution between CNN feature maps, a linear map of every token
between ViT blocks), give a model of every size in between (`modrun stitch`).

This module imports no torch: it names the families and what a stitch run's anchors must agree on.
"""

from __future__ import annotations

from typing import Any

from modrun.methods.grow import RESNETS

# the registered models that have `stages()`; any two in one family stitch (the resnets share stage shapes; vits
# of equal depth and patch, stitched block k to block k as SN-Net does)
FAMILIES = {"cnn_small": ("cnn_small",), "resnet": RESNETS, "vit": ("vit",)}
STAGES = {"cnn_small": 4, "resnet": 5}  # len(model.stages()): stitch points are 0 .. STAGES - 2
DATA_KEYS = ("name", "channels", "num_classes", "image_size")  # what the anchors' data must share with the run's
STITCH_FILE = "stitch.json"


def family(node: dict[str, Any]) -> str | None:
    """The family of a model config node, or None when modrun cannot stitch that model."""
    return next((f for f, names in FAMILIES.items() if node.get("name") in names), None)


def stage_count(node: dict[str, Any]) -> int | None:
    """len(model.stages()) of a model config node: fixed for CNNs, depth + 1 for a vit (the embedding joins block
    0, the readout is the last); None when the node does not say (an anchor config that leaves depth unset)."""
    if family(node) != "vit":
        return STAGES.get(family(node) or "")
    depth = node.get("depth")
    return depth + 1 if isinstance(depth, int) and not isinstance(depth, bool) else None


def data_mismatch(anchor_data: dict[str, Any], data: dict[str, Any]) -> str | None:
    """The first data key an anchor was trained with differently from this run ('key a vs b'), or None."""
    for key in DATA_KEYS:
        if anchor_data.get(key) is not None and data.get(key) is not None and anchor_data[key] != data[key]:
            return f"data.{key} {anchor_data[key]} vs {data[key]}"
    return None
