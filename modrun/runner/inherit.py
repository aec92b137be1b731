"""`source.run=RUN` brings its model and data: a pruned or grown model must see the data (tokenizer, block size,
image size) it was trained on, so the groups the user did not choose are written out as the overrides that
rebuild the source run's own `model` and `data` nodes; `teacher.run=RUN` brings the teacher's architecture
(model@teacher) alike. The user's own overrides come after and win."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from modrun.core.errors import UserError
from modrun.core.records import read_text
from modrun.runner.compose import Composer

# a run key -> (group, package, the recorded node it rebuilds) for each group it brings
INHERITED = {
    "source.run": (("model", "", "model"), ("data", "", "data")),  # prune, grow: the model and what it read
    "teacher.run": (("model", "teacher", "model"),),  # distill: the teacher's architecture (the data is the student's)
}
KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def with_source(composer: Composer, overrides: list[str]) -> list[str]:
    """`overrides` with the source (teacher) run's group choices put first (once: lines it wrote are choices).
    A sweep over source.run inherits alike from every run it names, or names model= and data= itself."""
    overrides = _sorted_exits(composer, overrides)
    parsed = composer.parse(overrides)
    if any(o.key_or_group == "experiment" for o in parsed):
        return overrides  # a recipe chooses its own groups
    chosen = {(o.key_or_group, o.package or "") for o in parsed if not o.is_hydra_override()}
    given = {o.key_or_group for o in parsed}
    lines: list[str] = []
    for key, groups in INHERITED.items():
        runs = [o for o in parsed if o.key_or_group == key]
        todo = [(g, pkg, node) for g, pkg, node in groups if (g, pkg) not in chosen]
        if not runs or not todo:
            continue
        o = runs[-1]
        values = list(getattr(o.value(), "list", [])) if o.is_sweep_override() else [o.value()]
        found = {tuple(_inherited(composer, run, todo, given)) for run in values if isinstance(run, str) and run}
        if len(found) > 1:
            raise UserError(f"{key}: the runs swept were trained on different models or data; name the groups")
        lines += found.pop() if found else ()
    return [*lines, *overrides]


def _sorted_exits(composer: Composer, overrides: list[str]) -> list[str]:
    """`nested=sorted nested.exits=[...]` (Sorted LLaMA's spelling, SortedNet in depth) is nested=exits: the
    choice is written out so the run's record names the method it ran."""
    parsed = composer.parse(overrides)
    keys = {o.key_or_group for o in parsed}
    if "nested.exits" not in keys or not any(_is_sorted(o) for o in parsed):
        return overrides
    widths = sorted(k for k in keys if k in ("nested.widths", "nested.depths"))
    if widths:
        raise UserError(f"nested.exits with {widths[0]}: exits train depths of whole blocks; drop one of them")
    return ["nested=exits" if _is_sorted(o) else o.input_line for o in parsed]


def _is_sorted(o: Any) -> bool:
    return o.key_or_group == "nested" and not o.package and not o.is_sweep_override() and o.value() == "sorted"


def _inherited(composer: Composer, run: str, groups: list[tuple[str, str, str]], given: set[str]) -> list[str]:
    record, lines = _recorded(Path(run)), []
    for group, package, recorded in groups if record is not None else []:
        node = record.get(recorded)
        if not isinstance(node, DictConfig) or not isinstance(node.get("name"), str):
            continue
        if node.name not in composer.options(group):
            continue  # a component of one's own under another option name: the checks compare it as before
        option = f"{group}@{package}={node.name}" if package else f"{group}={node.name}"
        lines.append(option)
        default = OmegaConf.to_container(composer.compose([option]), resolve=False)
        for key, value, text in _leaves(OmegaConf.to_container(node, resolve=False), package or group):
            old = _get(default, key)
            if key not in given and old != value:  # only what differs from the option's own defaults
                lines.append(f"{'++' if old is _ABSENT else ''}{key}={text}")
    return lines


def _recorded(run: Path) -> DictConfig | None:
    """The source run's config.yaml, or None where there is none to read (the source checks then say why)."""
    if not (run / "config.yaml").is_file():
        return None
    try:
        cfg = OmegaConf.create(read_text(run / "config.yaml"))
    except Exception:  # noqa: BLE001 - a damaged record: the source checks report it in their own words
        return None
    return cfg if isinstance(cfg, DictConfig) else None


_ABSENT = object()


def _get(tree: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _ABSENT
        tree = tree[part]
    return tree


def _leaves(node: dict, prefix: str) -> list[tuple[str, Any, str]]:
    """(dotted key, value, value in Hydra's override grammar) of every leaf; a dict inside a list stays whole."""
    found = []
    for key, value in node.items():
        if not isinstance(key, str) or not KEY.match(key):
            raise UserError(f"source.run: its config.yaml has a key {key!r} under {prefix} that is not a name")
        path = f"{prefix}.{key}"
        if isinstance(value, dict) and value:
            found += _leaves(value, path)
        else:
            found.append((path, value, _hydra_value(value, path)))
    return found


def _hydra_value(value: Any, key: str) -> str:
    """A recorded value written so that Hydra reads it back as the same value, never as an interpolation."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        if "${" in value:
            raise UserError(
                f"source.run: its config.yaml holds an interpolation at {key} ({value!r}); records are resolved"
            )
        # Hydra's quoted strings: a backslash is literal unless a run of them precedes a quote (or the end)
        return "'" + re.sub(r"(\\+)(?='|\Z)", r"\1\1", value).replace("'", "\\'") + "'"
    if isinstance(value, list):
        return "[" + ",".join(_hydra_value(v, key) for v in value) + "]"
    if isinstance(value, dict):
        items = []
        for k, v in value.items():
            if not isinstance(k, str) or not KEY.match(k):
                raise UserError(f"source.run: its config.yaml has a key {k!r} under {key} that is not a name")
            items.append(f"{k}:{_hydra_value(v, key)}")
        return "{" + ",".join(items) + "}"
    raise UserError(f"source.run: its config.yaml holds a {type(value).__name__} at {key}")
