"""`modrun reproduce RUN_DIR`: re-run a run from its own record into a new folder, then diff the results.

The record is the run folder: config.yaml (resolved: seed and every value), overrides.txt, env.json, git.json
and git.diff. Differences of environment, git state or config tree are warnings, one line each: the point
is to see what changed, and a reproduction in a changed environment is still worth having.
"""

from __future__ import annotations

# imports inside functions here defer torch (lifecycle, artifacts): the CLI imports this module for `--help`
import hashlib
import struct
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from modrun.core.environment import env_info, git_info
from modrun.core.errors import UnsafeInput, UserError
from modrun.core.records import read_lines
from modrun.core.registry import RECIPES
from modrun.core.runfolder import discard_run_dir, read_json, reserve_run_dir, write_json

# what can change a result; executable and argv always differ and say nothing about the numbers
ENV_KEYS = ("python", "torch", "modrun", "platform", "machine", "cpu_count", "torch_threads", "cuda", "gpus")


def reproduce_run(run_dir: Path, imports: list[str] | None = None) -> int:
    """Re-run `run_dir` into runs_dir/<command>/<timestamp>_<name>_repro; 0 when it completed, whatever it found.

    `imports`: the modules the user trusts (+imports=[...]); the record may name no others."""
    from modrun.core.artifacts import load_run_config
    from modrun.runner.validate import check_record

    run_dir, given = Path(run_dir), list(imports or [])
    cfg, status = load_run_config(run_dir)
    command, state = status.get("command"), status.get("state")
    if command not in RECIPES:
        raise UserError(f"{run_dir}: only {', '.join(RECIPES.names())} runs can be reproduced (it is {command!r})")
    check_record(command, cfg, run_dir, given)  # a record is input: checked like a command line, before any work
    overrides = read_lines(run_dir / "overrides.txt")
    notes = [] if state == "completed" else [f"{run_dir} is {state}, not completed; reproducing it anyway"]
    notes += environment_differences(run_dir)
    _warn(*notes)
    # beside the original (runs_dir/<command>/); a sweep's job goes under its config's runs_dir/<command>/
    root = run_dir.parent.parent if run_dir.parent.name == command else Path(cfg.runs_dir)
    new = _reserve(root, command, f"{cfg.name}_repro")
    record: dict[str, Any] = {"original": str(run_dir.resolve()), "original_state": state, "command": command}
    record["overrides"] = overrides  # as typed; config.yaml is what runs
    try:
        code = _run(command, cfg, overrides, run_dir, new, notes, record, given)
    except UserError:
        if not (new / "checkpoints" / "last.pt").exists():
            discard_run_dir(new)  # refused before anything trained: no half-made reproduction left
        raise
    record.update(differences=notes, exit_code=code)
    if code != 0:
        write_json(new / "reproduces.json", record)
        _warn(f"the reproduction in {new} did not complete (exit code {code}); see its log.txt")
        return code
    if not (run_dir / "summary.json").is_file():  # an interrupted or failed original: nothing to set it against
        write_json(new / "reproduces.json", {**record, "comparison": None})
        print(f"reproduced into {new}; the original has no summary.json ({state}), so there is nothing to compare")
        return 0
    record["comparison"] = compare(run_dir, new)
    write_json(new / "reproduces.json", record)
    if not notes:
        print("environment, git state and config tree: as recorded")
    print_comparison(record["comparison"], run_dir, new)
    return 0


def _reserve(root: Path, command: str, name: str) -> Path:
    try:
        return reserve_run_dir(root, command, name)
    except OSError as e:
        raise UserError(f"cannot create the reproduction's folder under {root}: {e.strerror or e}") from None


def _run(
    command: str,
    cfg: DictConfig,
    overrides: list[str],
    original: Path,
    new: Path,
    notes: list[str],
    record: dict,
    given: list[str],
) -> int:
    """Run the recorded config as a Hydra job composed from the recorded overrides.

    Why both: config.yaml is what ran (every value resolved, seed included), so that is what runs again, even
    if the packaged config tree has changed since; composing the overrides through Hydra as `modrun train`
    did gives the new folder a complete `.hydra/` like any other run's, and shows (as warnings) where today's
    tree would compose something else. If the overrides no longer compose, config.yaml runs without Hydra."""
    from modrun.core.runfolder import write_record
    from modrun.runner.compose import Composer, hydra_free_copy
    from modrun.runner.lifecycle import execute
    from modrun.runner.validate import compose_and_validate

    def task(job_cfg: DictConfig | None) -> int:
        if job_cfg is not None:
            changed = config_differences(cfg, hydra_free_copy(job_cfg))
            _warn(*changed)
            notes.extend(changed)
        write_json(new / "reproduces.json", {**record, "differences": notes})  # a pointer even if killed
        write_record(new, cfg, command, overrides, argv=["reproduce", str(original)])
        return execute(command, cfg, new)

    with Composer(command, _config_dir(original)) as composer:
        try:
            _, hydra_overrides = compose_and_validate(composer, overrides, allowed_imports=given)
        except UnsafeInput:
            raise  # a record that would write outside its folder or run code is refused, not worked around
        except UserError as e:
            notes.append(f"the recorded overrides no longer compose ({e.messages[0]}); running config.yaml alone")
            _warn(notes[-1])
        else:
            record["ran_as"] = "hydra job from overrides.txt, running config.yaml"
            return composer.run(hydra_overrides, new, task)
    record["ran_as"] = "config.yaml (no .hydra/)"
    return task(None)


def _config_dir(run_dir: Path) -> Path | None:
    """The --config-dir the run was composed with, from Hydra's record (absolute), when it still exists."""
    path = run_dir / ".hydra" / "hydra.yaml"
    if not path.is_file():
        return None
    sources = OmegaConf.select(OmegaConf.load(path), "hydra.runtime.config_sources", default=[]) or []
    for s in sources:
        if s.get("provider") == "command-line" and s.get("schema") == "file" and Path(s.path).is_dir():
            return Path(s.path)
    return None


def environment_differences(run_dir: Path) -> list[str]:
    """One line per difference between the recorded environment and git state and the current ones."""
    notes = []
    if (run_dir / "env.json").is_file():
        then, now = read_json(run_dir / "env.json"), env_info()
        notes += [f"{k}: {then.get(k)} recorded, {now.get(k)} now" for k in ENV_KEYS if then.get(k) != now.get(k)]
        old, new = then.get("packages", {}), now["packages"]
        for name in sorted(set(old) | set(new)):
            if old.get(name) != new.get(name):
                notes.append(f"package {name}: {old.get(name, 'absent')} recorded, {new.get(name, 'absent')} now")
    else:
        notes.append("no env.json: the environment cannot be compared")
    was = read_json(run_dir / "git.json") if (run_dir / "git.json").is_file() else None
    now_git = git_info(Path.cwd())
    if was is None and now_git is not None:
        notes.append(f"git: the run recorded no repository; now at commit {now_git[0]['commit'][:12]}")
    elif was is not None and now_git is None:
        notes.append(f"git: the run was at commit {was['commit'][:12]}; the current directory is not a repository")
    elif was is not None and now_git is not None:
        now, diff = now_git
        if was.get("commit") != now["commit"]:
            notes.append(f"git: commit {str(was.get('commit'))[:12]} recorded, {now['commit'][:12]} now")
        if was.get("dirty") != now["dirty"]:
            state = {True: "dirty", False: "clean"}
            notes.append(f"git: working tree {state[bool(was.get('dirty'))]} recorded, {state[now['dirty']]} now")
        recorded = (run_dir / "git.diff").read_text() if (run_dir / "git.diff").is_file() else ""
        if recorded != diff:
            notes.append("git: the uncommitted changes (git diff HEAD) differ from the recorded git.diff")
    return notes


def config_differences(recorded: DictConfig, composed: DictConfig) -> list[str]:
    """Keys where today's config tree composes something other than the recorded config.yaml."""
    a, b = OmegaConf.to_container(recorded, resolve=True), OmegaConf.to_container(composed, resolve=True)
    out: list[str] = []

    def walk(x: Any, y: Any, key: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y), key=str):
                walk(x.get(k, "<absent>"), y.get(k, "<absent>"), f"{key}.{k}" if key else str(k))
        elif x != y:
            out.append(f"config: {key} composes to {y} now, {x} recorded; running the recorded value")

    walk(a, b, "")
    return out


def _same(a: Any, b: Any) -> bool:
    """Bitwise equality for floats (0.0 vs -0.0 and NaN included), plain equality otherwise."""
    if isinstance(a, float) and isinstance(b, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    return type(a) is type(b) and a == b


def compare(original: Path, new: Path) -> dict[str, Any]:
    """Final and best metrics of summary.json side by side, the weights files' bytes, a distillation's teachers."""
    a, b = (read_json(r / "summary.json") if (r / "summary.json").is_file() else {} for r in (original, new))
    rows = []
    for section in ("final", "best"):
        x, y = a.get(section) or {}, b.get(section) or {}
        for key in sorted(set(x) | set(y)):
            u, v = x.get(key), y.get(key)
            diff = abs(u - v) if all(isinstance(t, (int, float)) for t in (u, v)) else None
            rows.append({"metric": f"{section}/{key}", "original": u, "reproduction": v, "abs_diff": diff})
            rows[-1]["identical"] = _same(u, v)
    sha = [sha256(r / "model.safetensors") for r in (original, new)]
    weights = {
        "original_sha256": sha[0],
        "reproduction_sha256": sha[1],
        "identical": None not in sha and len(set(sha)) == 1,
    }
    result: dict[str, Any] = {"metrics": rows, "weights": weights}
    if (original / "teacher.json").is_file() and (new / "teacher.json").is_file():
        teachers = [
            [t.get("weights_sha256") for t in read_json(r / "teacher.json", list) if isinstance(t, dict)]
            for r in (original, new)
        ]
        result["teachers_identical"] = teachers[0] == teachers[1]
    same = [bool(rows), *(r["identical"] for r in rows), weights["identical"], result.get("teachers_identical", True)]
    result["identical"] = all(same)
    return result


def sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def print_comparison(result: dict[str, Any], original: Path, new: Path) -> None:
    table = Table("metric", "original", "reproduction", "|diff|", "", title=f"{original} vs {new}")
    for r in result["metrics"]:
        diff = "" if r["abs_diff"] is None else f"{r['abs_diff']:.3g}"
        table.add_row(r["metric"], _fmt(r["original"]), _fmt(r["reproduction"]), diff, _verdict(r["identical"]))
    w = result["weights"]
    short = [(s or "absent")[:12] for s in (w["original_sha256"], w["reproduction_sha256"])]
    table.add_row("model.safetensors", *short, "", _verdict(w["identical"]))
    if "teachers_identical" in result:
        table.add_row("teacher weights (sha256)", "", "", "", _verdict(result["teachers_identical"]))
    console = Console(width=max(Console().width, 110))  # the full numbers fit even when not on a terminal
    console.print(table)
    if result["identical"]:
        console.print("reproduced: every metric and the weights are bitwise identical")
    else:
        differ = sum(not r["identical"] for r in result["metrics"])
        console.print(
            f"not identical: {differ} of {len(result['metrics'])} metrics differ; weights {_verdict(w['identical'])}"
        )


def _fmt(v: Any) -> str:
    return "—" if v is None else f"{v:.8g}" if isinstance(v, float) else str(v)


def _verdict(same: bool) -> str:
    return "identical" if same else "differs"


def _warn(*messages: str) -> None:
    for m in messages:
        print(f"modrun: warning: {m}", file=sys.stderr)
