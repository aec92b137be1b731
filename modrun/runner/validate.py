"""Validation before any work: overrides are checked against the config tree, then the composed config as a
whole; every problem is reported at once, one line each, with the closest valid name suggested."""

from __future__ import annotations

# imports inside functions here defer torch: the config is checked before torch is loaded (a bad key costs no import)
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from modrun.core.errors import UserError, did_you_mean
from modrun.core.registry import RECIPES, import_user_modules, trusted_imports
from modrun.core.values import suggest_key, type_problem
from modrun.runner.checks import (
    check_config,
    check_deletions,
    check_resolvable,
    check_tasks,
    components,
    dotted_keys,
)
from modrun.runner.compose import Composer, compose_plain
from modrun.runner.inherit import with_source
from modrun.runner.prerequisites import needed_config


def compose_and_validate(
    composer: Composer, overrides: list[str], allowed_imports: list[str] | None = None
) -> tuple[DictConfig, list[str]]:
    """Compose `overrides` and check the result; raise one UserError listing every problem.

    `allowed_imports`: overrides read from a record (reproduce) may import only these modules, the user's own.
    Returns the config and the overrides to hand to Hydra (shorthands such as `kd.beta=8` written out, the
    model and data of a source.run put first)."""
    overrides = with_source(composer, overrides)
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
    cfg = base if good == group_lines else composer.compose(good)  # composing costs ~0.1 s: once where it can
    imports = cfg.get("imports")
    if allowed_imports is not None and _module_names(imports):
        trusted_imports(cfg, allowed_imports, Path("overrides.txt"))
    # a malformed imports (a string, numbers) is not imported but reported by check_config
    import_user_modules(list(imports) if _module_names(imports) else [])
    deleted = any(line.startswith("~") for line in group_lines)
    reference = composer.compose([line for line in group_lines if not line.startswith("~")]) if deleted else base
    errors += (
        check_deletions(cfg, reference) or check_tasks(cfg) or check_resolvable(cfg) or check_config(cfg, reference)
    )
    if not errors:
        errors += check_processes(composer.command, cfg)
    if not errors:
        from modrun.engine.speed import check as check_speed  # imports torch: only once the config is sound

        errors += check_speed(cfg)  # trainer.precision on this device, data loader keys
    if not errors:
        from modrun.components.drybuild import check_build

        errors += check_build(cfg)  # models on the meta device, optimizer and schedule with their arguments
    if not errors:
        from modrun.components.data.checks import check_data

        errors += check_data(cfg)  # files that are not images, empty splits, labels out of range
    if not errors and composer.command in RECIPES:
        recipe = RECIPES.get(composer.command)
        errors += recipe.check(cfg)  # what only this command needs (teacher sources, pruning scope, ...)
        if not errors:
            errors += check_needs(recipe.needs(cfg), cfg, composer.config_dir)
    if errors:
        raise UserError(*errors)
    return cfg, good


def _module_names(imports: Any) -> bool:
    return isinstance(imports, ListConfig) and all(isinstance(m, str) for m in imports)


STRATEGIES = ("ddp", "fsdp")
FSDP_COMMANDS = ("train", "distill")  # pruning masks, grown and stitched models act on whole weights between steps


def check_processes(command: str, cfg: DictConfig) -> list[str]:
    """What a data-parallel run (trainer.devices x trainer.nodes > 1) does not support yet."""
    t = cfg.get("trainer") or {}
    devices, nodes = t.get("devices", 1), t.get("nodes", 1)
    bad = [
        f"trainer.{k}={v}: must be a whole number >= 1" for k, v in (("devices", devices), ("nodes", nodes)) if v < 1
    ]
    if "TORCHELASTIC_RUN_ID" in os.environ:  # each torchrun process would make a whole run of its own
        bad.append(
            "modrun starts its own processes: run it without torchrun, with trainer.devices=N "
            "(and trainer.nodes, trainer.rdzv_endpoint across machines)"
        )
    strategy = t.get("strategy", "ddp")
    if strategy not in STRATEGIES:
        bad.append(f"trainer.strategy={strategy}: expected one of {', '.join(STRATEGIES)}")
    if bad:
        return bad
    if strategy == "fsdp":
        if devices * nodes == 1:
            return [
                "trainer.strategy=fsdp shards the model over several processes: set trainer.devices=2 or more "
                "(or trainer.strategy=ddp)"
            ]
        kd = cfg.get("kd") or {}
        if command not in FSDP_COMMANDS or (cfg.get("nested") or {}).get("name", "none") != "none" or kd.get("m2m"):
            return [
                f"trainer.strategy=fsdp: supported by modrun {' and modrun '.join(FSDP_COMMANDS)} (without nested "
                "or kd=m2m); "
                "use trainer.strategy=ddp here"
            ]
    if devices * nodes == 1:
        return bad
    kd = cfg.get("kd") or {}
    if kd.get("cache_teacher"):
        return ["kd.cache_teacher=true is single-process: set trainer.devices=1 or kd.cache_teacher=false"]
    if any(term.get("name") == "crd" for term in (kd.get("terms") or {}).values()):
        return ["kd=crd keeps a per-sample memory bank in one process: set trainer.devices=1 for CRD"]
    return []


def validate_sweep(composer: Composer, overrides: list[str], limit: int = 200) -> tuple[DictConfig, list[str]]:
    """Check a sweep before any job starts; return the first job's config and the overrides for Hydra.

    Every value of every swept key is tried once, each in the first job's company (one sweep of values per
    key, not the whole product: the product's jobs only combine values that were each checked). Intervals
    (for sweepers such as optuna) are tried at both ends."""
    parsed = composer.parse(with_source(composer, overrides))
    sweeps = [o for o in parsed if o.is_sweep_override() and not _is_hydra(o)]
    # a sweeper such as optuna may take its parameters from hydra.sweeper.params alone
    if not sweeps and not any(o.key_or_group == "hydra/sweeper" for o in parsed):
        raise UserError("a sweep needs at least one swept key, e.g. seed=0,1,2 or optim.lr=0.1,0.05")
    values = {o.input_line: _representatives(o) for o in sweeps}

    def job(choice: dict[str, str]) -> list[str]:
        return [choice.get(o.input_line, o.input_line) for o in parsed]

    first = {line: vals[0] for line, vals in values.items()}
    first_cfg, _ = compose_and_validate(composer, job(first))
    jobs = [job({**first, line: v}) for line, vals in values.items() for v in vals[1:]]
    errors: list[str] = []
    for lines in jobs[:limit]:
        try:
            compose_and_validate(composer, lines)
        except UserError as e:
            errors += [m for m in e.messages if m not in errors]
    if errors:
        raise UserError(*errors)
    # kd.X shorthands are written out against the first job's config, for Hydra and so for every job alike
    return first_cfg, [_expanded(composer, first_cfg, o) for o in parsed]


def _is_hydra(o: Any) -> bool:
    return o.is_hydra_override() or o.key_or_group.startswith("hydra/")


def _representatives(o: Any) -> list[str]:
    key = o.get_key_element()
    if o.is_discrete_sweep():
        return [f"{key}={v}" for v in o.sweep_string_iterator()]
    sweep = o.value()  # an interval
    return [f"{key}={sweep.start}", f"{key}={sweep.end}"]


def _expanded(composer: Composer, cfg: DictConfig, o: Any) -> str:
    if _is_hydra(o) or o.key_or_group in composer.groups():
        return o.input_line
    return _expand_kd_shorthand(composer, cfg, set(dotted_keys(cfg)), o).input_line


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
    try:
        old = OmegaConf.select(base, key, throw_on_missing=False)
    except OmegaConfBaseException:  # an interpolation that does not resolve here (gpt's ${data.vocab_size} on images)
        return []  # the task and resolvability checks name the real problem
    problem = type_problem(old, o.value(), key)
    return [f"{key}={o.get_value_element_as_str()}: {problem}"] if problem else []


def check_needs(needs: list[Any], cfg: DictConfig, config_dir: Any) -> list[str]:
    """The configs of the runs this one needs first compose and validate (a bad teacher.overrides is exit 2 now,
    not after the student's folder was made)."""
    from modrun.runner.checks import check_config

    errors = []
    for need in needs:
        owner = need.key.removesuffix(".run")  # teacher, source, anchors.1
        try:
            needed = needed_config(need, cfg, config_dir)
        except UserError as e:
            errors += [f"{owner}.overrides: {m}" for m in e.messages]
            continue
        errors += [f"{owner} ({need.command}): {m}" for m in check_config(needed, needed)]
    return errors


def check_record(command: str, cfg: DictConfig, run_dir: Path, given: list[str], whole: bool = True) -> None:
    """A run folder's config.yaml checked like a command line before it runs again (resume, reproduce, eval):
    imports, then (`whole`) every key the command needs, then types, values and registry names."""
    record = Path(run_dir) / "config.yaml"
    trusted_imports(cfg, given, record)
    reference = _recorded_reference(command, cfg)
    errors = (check_deletions(cfg, reference) if whole else []) or _type_problems(cfg, reference)
    errors = errors or check_tasks(cfg) or check_resolvable(cfg) or check_config(cfg, cfg)
    if errors:
        raise UserError(*(f"{record}: {m}" for m in errors))


def _recorded_reference(command: str, cfg: DictConfig) -> DictConfig:
    """The packaged tree composed with the record's own choices (data=python_docs, prune=imp), so that every key
    the command reads is there (`whole`), typed as in the tree; a choice the tree lacks (a component of one's
    own, or one named differently from its option) is its own reference."""
    default = compose_plain(command, [])
    chosen, options = [], []
    for path, _ in components(cfg):
        node, ref = OmegaConf.select(cfg, path), OmegaConf.select(default, path, throw_on_missing=False)
        if not isinstance(node, DictConfig) or (isinstance(ref, DictConfig) and ref.get("name") == node.get("name")):
            continue
        chosen.append((path, node))
        line = f"{'model@teacher' if path == 'teacher' else path}={node.get('name')}"
        try:  # an option of the tree of that name that builds that component
            if OmegaConf.select(compose_plain(command, [line]), f"{path}.name") == node.get("name"):
                options.append(line)
        except (UserError, OmegaConfBaseException):
            pass
    reference = compose_plain(command, options) if options else default
    for path, node in chosen:
        if OmegaConf.select(reference, f"{path}.name", throw_on_missing=False) != node.get("name"):
            OmegaConf.update(reference, path, node, merge=False, force_add=True)
    return reference


def _type_problems(cfg: DictConfig, reference: DictConfig) -> list[str]:
    """Values of a recorded config whose type differs from the packaged tree's (components' own arguments are
    checked against their signatures by check_config)."""
    found = [path for path, _ in components(cfg)]
    known, problems = set(dotted_keys(reference)), []
    for key in dotted_keys(cfg):
        if key not in known or any(key == p or key.startswith(p + ".") for p in found):
            continue
        value = OmegaConf.select(cfg, key)
        problem = (
            None
            if isinstance(value, (DictConfig, ListConfig))
            else type_problem(reference_value(reference, key), value, key)
        )
        problems += [f"{key}={value}: {problem}"] if problem else []
    return problems


def reference_value(reference: DictConfig, key: str) -> Any:
    return OmegaConf.select(reference, key, throw_on_missing=False)
