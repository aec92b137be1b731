"""One generic registry: components are chosen in configs by registered name, never by import path.

Built-in components are declared lazily ("module:attr") so that `modrun list` and `modrun --help` do not
import torch; user components register eagerly with the decorator:

    from modrun.core.registry import MODELS

    @MODELS.register("my_net")
    def my_net(in_channels: int, num_classes: int, width: int = 16): ...
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from modrun.core.errors import UnsafeInput, UserError, did_you_mean


@dataclass
class Entry:
    name: str
    summary: str
    target: str | None = None  # "module:attr" for lazy entries
    obj: Any = None

    def load(self) -> Any:
        if self.obj is None:
            module, attr = self.target.split(":")
            self.obj = getattr(importlib.import_module(module), attr)
        return self.obj


class Registry:
    """Maps names to factories (functions or classes)."""

    def __init__(self, kind: str, catalog: str | None = None) -> None:
        self.kind = kind
        self._catalog = catalog  # module that declares the built-in entries, imported on first use
        self._entries: dict[str, Entry] = {}

    def _load_catalog(self) -> None:
        if self._catalog is not None:
            catalog, self._catalog = self._catalog, None
            importlib.import_module(catalog)

    def _add(self, entry: Entry) -> None:
        if entry.name in self._entries:
            raise ValueError(f"{self.kind} '{entry.name}' is already registered")
        self._entries[entry.name] = entry

    def register(self, name: str | None = None, summary: str | None = None) -> Callable[[Any], Any]:
        """Decorator: register a factory under `name` (default: its __name__)."""

        def decorate(obj: Any) -> Any:
            self._load_catalog()  # so a user entry clashing with a built-in is caught
            doc = (obj.__doc__ or "").strip().splitlines()
            self._add(Entry(name or obj.__name__, summary or (doc[0] if doc else ""), obj=obj))
            return obj

        return decorate

    def lazy(self, name: str, target: str, summary: str) -> None:
        """Declare a built-in entry without importing it."""
        self._add(Entry(name, summary, target=target))

    def get(self, name: str) -> Any:
        self._load_catalog()
        if name not in self._entries:
            raise UserError(f"unknown {self.kind} '{name}'{did_you_mean(str(name), self._entries)}")
        return self._entries[name].load()

    def loaded(self, name: str) -> Any:
        """The factory of `name` if it is already imported (a user's, registered by decorator), else None:
        reads declarations such as `task` without importing a lazy built-in."""
        self._load_catalog()
        entry = self._entries.get(name)
        return entry.obj if entry is not None else None

    def __contains__(self, name: str) -> bool:
        self._load_catalog()
        return name in self._entries

    def names(self) -> list[str]:
        self._load_catalog()
        return sorted(self._entries)

    def summaries(self, declared: bool = False) -> list[tuple[str, str]]:
        """(name, summary) pairs, sorted by name, or in the order they were declared."""
        self._load_catalog()
        names = list(self._entries) if declared else sorted(self._entries)
        return [(n, self._entries[n].summary) for n in names]


def missing_package(factory: Any, choice: str) -> str | None:
    """One line saying what to install when `factory` declares an optional package that is absent.

    A component declares it as `requires = (module, pip requirement)`; find_spec imports nothing."""
    module, requirement = getattr(factory, "requires", (None, None))
    if module is None or importlib.util.find_spec(module) is not None:
        return None
    return f"{choice} needs the {module} package: pip install '{requirement}'"


MODELS = Registry("model", "modrun.components.models")
DATASETS = Registry("dataset", "modrun.components.data")
OPTIMIZERS = Registry("optimizer", "modrun.components.optim")
SCHEDULERS = Registry("scheduler", "modrun.components.optim")
LOGGERS = Registry("logger", "modrun.components.loggers")
KD_METHODS = Registry("kd method", "modrun.methods.distill")
PRUNERS = Registry("pruner", "modrun.methods.prune")
RECIPES = Registry("command", "modrun.recipes")  # the commands that run a composed config

# `modrun list GROUP` looks groups up here; later features add their registries.
REGISTRIES: dict[str, Registry] = {
    "models": MODELS,
    "datasets": DATASETS,
    "optimizers": OPTIMIZERS,
    "schedulers": SCHEDULERS,
    "loggers": LOGGERS,
    "kd": KD_METHODS,
    "pruners": PRUNERS,
    "commands": RECIPES,
}


MODULE_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def import_user_modules(modules: list[str]) -> None:
    """Import the user's own modules (`+imports=[my_models]`) and installed `modrun.plugins` entry points."""
    bad = [m for m in modules if not isinstance(m, str) or not MODULE_NAME.match(m)]
    if bad:  # '' or '.foo' would be a relative import, or no module at all
        raise UserError(f"imports: {bad[0]!r} is not a module name (e.g. +imports=[my_models] or [pkg.models])")
    for ep in entry_points(group="modrun.plugins"):
        ep.load()
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):
                raise UserError(f"imports: cannot import module '{module}' (is it on PYTHONPATH?)") from None
            raise


def split_imports(args: list[str]) -> tuple[list[str], list[str]]:
    """The modules named by `imports=[a,b]` / `+imports=[a,b]` among `args` (the user's command line), and the rest.

    A run folder's config.yaml may name modules too; modrun imports only those the user names here."""
    from omegaconf import ListConfig, OmegaConf  # here: `modrun list` reads registries without OmegaConf

    modules, rest = [], []
    for a in args:
        key, eq, value = a.partition("=")
        if key.lstrip("+") != "imports" or not eq:
            rest.append(a)
            continue
        try:
            parsed = OmegaConf.create({"imports": OmegaConf.from_dotlist([f"x={value}"]).x}).imports
        except Exception:  # noqa: BLE001 - any parse error of the user's value is bad input
            parsed = None
        if not isinstance(parsed, ListConfig) or not all(isinstance(m, str) for m in parsed):
            raise UserError(f"{a}: expects a list of module names, e.g. +imports=[my_models]")
        modules += [m for m in parsed if m not in modules]
    return modules, rest


def trusted_imports(cfg: Any, given: list[str], record: Any) -> None:
    """Import the modules the user named (`+imports=[...]`) after checking that they cover the record's own:
    a run folder from someone else must not run code by naming a module in its config.yaml."""
    recorded = [str(m) for m in cfg.get("imports") or []]
    untrusted = [m for m in recorded if m not in given]
    if untrusted:
        raise UnsafeInput(
            f"{record}: names imports={untrusted}, and modrun imports no module that a run folder names; "
            f"if you trust that code, add +imports=[{','.join(recorded)}]"
        )
    import_user_modules(list(given))
