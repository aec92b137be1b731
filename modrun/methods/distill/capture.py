"""Named intermediate outputs, captured by forward hooks at module paths given in config."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from modrun.core.errors import UserError, did_you_mean

ROLES = ("last", "all", "embedding")


def resolve_layers(model: nn.Module, spec: str | Sequence[str] | None, key: str) -> list[str]:
    """Module paths for a layer spec: a path, a list of paths, or a role the model declares
    (`last` / `all` of its `feature_layers`, or its `embedding_layer`). Unknown paths are bad input."""
    if spec is None:
        return []
    items = [spec] if isinstance(spec, str) else list(spec)
    names = dict(model.named_modules())
    paths: list[str] = []
    for item in items:
        if item in ROLES:
            layers = list(getattr(model, "feature_layers", ()))
            embedding = getattr(model, "embedding_layer", None)
            if (item != "embedding" and not layers) or (item == "embedding" and embedding is None):
                raise UserError(f"{key}={item}: model {type(model).__name__} declares no feature layers; give paths")
            paths += {"last": layers[-1:], "all": layers, "embedding": [embedding]}[item]
        elif item in names and item != "":
            paths.append(item)
        else:
            raise UserError(f"{key}={item}: no such module{did_you_mean(item, [n for n in names if n])}")
    return paths


class Capture:
    """Keeps the latest output of each hooked module; `take()` hands them over and forgets them."""

    def __init__(self, model: nn.Module, paths: Sequence[str]) -> None:
        self.paths = list(dict.fromkeys(paths))
        self.outputs: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        self.handles = [modules[p].register_forward_hook(self._hook(p)) for p in self.paths]

    def _hook(self, path: str):  # noqa: ANN202
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self.outputs[path] = output

        return hook

    def take(self) -> dict[str, torch.Tensor]:
        outputs, self.outputs = self.outputs, {}
        return outputs

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
