"""Validation before any work: overrides are checked against the config tree, then the composed config as a
whole; every problem is reported at once, one line each, with the closest valid name suggested."""

from __future__ import annotations

import importlib
from typing import Any

from omegaconf import DictConfig, OmegaConf

from modrun.checks import check_config, dotted_keys, suggest_key, type_problem
from modrun.compose import Composer
from modrun.errors import UserError, did_you_mean
from modrun.registry import import_user_modules

# checks that only one command needs, run on its composed config ("module:function" -> list of problems)
COMMAND_CHECKS = {"distill": "modrun.distill.checks:check", "prune": "modrun.prune.checks:check"}


def compose_and_validate(composer: Composer, overrides: list[str]) -> tuple[DictConfig, list[str]]:
    """Compose `overrides` and check the result; raise one UserError listing every problem.

    Returns the config and the overrides to hand to Hydra (shorthands such as `kd.beta=8` written out)."""
    parsed = composer.parse(overrides)
    groups = set(composer.groups())
    errors: list[str] = []
    group_lines, value_overrides = [], []
    for o in parsed:
        key = o.key_or_group
        if o.is_hydra_override() or key.startswith("hydra/"):
            group_lines.append(o.input_line)
        elif key in groups:
            problems = check_group_choice(composer, o)
            errors += problems
            group_lines += [] if problems else [o.input_line]
        else:
            value_overrides.append(o)
    base = composer.compose(group_lines)
    known = set(dotted_keys(base))
    good = list(group_lines)
    for o in value_overrides:
        o = _expand_kd_shorthand(composer, base, known, o)
        problems = check_value_override(base, known, o)
        errors += problems
        good += [] if problems else [o.input_line]
    # the overrides that passed are composed and checked as a whole, so every problem is reported at once
    cfg = composer.compose(good)
    import_user_modules(list(cfg.get("imports") or []))
    errors += check_config(cfg, composer.compose([line for line in group_lines if not line.startswith("~")]))
    if not errors and composer.command in COMMAND_CHECKS:
        module, attr = COMMAND_CHECKS[composer.command].split(":")
        errors += getattr(importlib.import_module(module), attr)(cfg)
    if errors:
        raise UserError(*errors)
    return cfg, good


def _expand_kd_shorthand(composer: Composer, base: DictConfig, known: set[str], o: Any) -> Any:
    """`kd.beta=8` means `kd.terms.<the one term>.beta=8` when a single KD method is selected."""
    terms = OmegaConf.select(base, "kd.terms")
    key = o.key_or_group
    if not key.startswith("kd.") or key.startswith("kd.terms") or key in known:
        return o
    if not isinstance(terms, DictConfig) or len(terms) != 1:
        return o
    full = f"kd.terms.{next(iter(terms))}.{key[3:]}"
    return composer.parse([o.input_line.replace(key, full, 1)])[0]


def check_group_choice(composer: Composer, o: Any) -> list[str]:
    if o.is_delete():
        return []
    value = o.value()
    choices = value if isinstance(value, list) else [value]
    options = composer.options(o.key_or_group)
    return [
        f"{o.key_or_group}={c}: no such {o.key_or_group} config{did_you_mean(str(c), options)}"
        for c in choices
        if str(c) not in options and c is not None
    ]


def check_value_override(base: DictConfig, known: set[str], o: Any) -> list[str]:
    key = o.key_or_group
    exists = key in known
    if o.is_delete():
        return [] if exists else [f"~{key}: no key {key} to delete{suggest_key(key, known)}"]
    if o.is_add():
        return [f"+{key}: {key} already exists — use {key}=... to change it"] if exists else []
    if o.is_force_add():
        return []
    if not exists:
        return [f"unknown key {key}{suggest_key(key, known)}"]
    if o.is_sweep_override():
        return []
    old = OmegaConf.select(base, key, throw_on_missing=False)
    problem = type_problem(old, o.value())
    return [f"{key}={o.get_value_element_as_str()}: {problem}"] if problem else []
