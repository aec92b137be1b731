"""Small checks on config values shared by the validation of every layer (numbers, devices, types, key suggestions)."""

from __future__ import annotations

import re
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from modrun.core.errors import closest, did_you_mean


def _kind(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "text", list: "a list", dict: "a mapping"}
    return f"{names.get(type(value), type(value).__name__)} '{value}'"


def is_number(value: Any) -> bool:
    """An int or float, not a bool (which Python counts as an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# numbers some recipe sets whose null the code reads as "not set" (one pass over the data, all of it, no clipping)
NULLABLE = {"data.windows_per_epoch", "data.max_bytes", "trainer.grad_clip"}


def type_problem(old: Any, new: Any, key: str | None = None) -> str | None:
    """Whether `new` may replace `old` (at `key`): the same kind of value (numbers may widen to float)."""
    if new is None and key in NULLABLE:
        return None
    if old is None or OmegaConf.is_missing(OmegaConf.create({"v": old}), "v"):
        return None
    if new is None:  # null may replace text or a node (teacher.run=null), not a number or a flag the run reads
        if isinstance(old, bool):
            return "expects true or false, got null"
        return f"expects {'an integer' if isinstance(old, int) else 'a number'}, got null" if is_number(old) else None
    if isinstance(old, bool):
        return None if isinstance(new, bool) else f"expects true or false, got {_kind(new)}"
    if isinstance(old, int):
        return None if isinstance(new, int) and not isinstance(new, bool) else f"expects an integer, got {_kind(new)}"
    if isinstance(old, float):
        ok = is_number(new)
        return None if ok else f"expects a number, got {_kind(new)}"
    if isinstance(old, (list, ListConfig)):
        return None if isinstance(new, (list, ListConfig)) else f"expects a list, got {_kind(new)}"
    if isinstance(old, (dict, DictConfig)):
        return None if isinstance(new, (dict, DictConfig)) else f"expects a mapping, got {_kind(new)}"
    if isinstance(old, str):
        return (
            None
            if isinstance(new, (str, int, float)) and not isinstance(new, bool)
            else f"expects text, got {_kind(new)}"
        )
    return None


def suggest_key(key: str, known: set[str]) -> str:
    """The closest known key, or else the valid keys beside it (same parent)."""
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    siblings = {k for k in known if (k.rsplit(".", 1)[0] if "." in k else "") == parent}
    best = closest(key.rsplit(".", 1)[-1], [k.rsplit(".", 1)[-1] for k in siblings])
    if best is not None:
        return f" — did you mean {parent + '.' if parent else ''}{best}?"
    if siblings:  # nothing close: list what is valid at that level
        return did_you_mean(key.rsplit(".", 1)[-1], [k.rsplit(".", 1)[-1] for k in siblings])
    return did_you_mean(key, known)  # the parent itself is unknown: look everywhere


DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def take_overrides(overrides: list[str], keys: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """Split the `key=value` overrides of these keys (the last of each wins) from the others."""

    def key(o: str) -> str:  # `+nested.width=0.5` means the same as `nested.width=0.5`
        return o.partition("=")[0].lstrip("+")

    picked = {key(o): o.partition("=")[2] for o in overrides if key(o) in keys}
    return picked, [o for o in overrides if key(o) not in keys]
