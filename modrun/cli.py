"""The `modrun` command line. Each command only plumbs arguments; the work happens in the modules it calls.

Everything after a command name is a Hydra override; options with dashes belong to modrun. Heavy imports
(torch, Hydra) happen inside the commands so that `modrun --help` and `modrun list` stay fast.
"""

from __future__ import annotations

# imports inside functions here defer torch and the runner: `modrun --help` and `modrun list` import neither
import sys
from collections.abc import Callable
from pathlib import Path

import typer

from modrun.core.errors import UserError, WriteFailed
from modrun.core.registry import RECIPES

app = typer.Typer(
    help="modrun: experiment runner for model compression research (train, distill, prune, sweep).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
runs_app = typer.Typer(help="Browse run folders: list, show, compare.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")

OVERRIDES = typer.Argument(None, help="Hydra overrides: key=value, group=option, +key=value, ~key")
CONFIG_DIR = typer.Option(None, "--config-dir", "-cd", help="Your own config tree, overlaid on modrun's.")
RUNS_DIR = typer.Option(None, "--runs-dir", help="Where run folders go (same as the override runs_dir=...).")
CFG = typer.Option(None, "--cfg", "-c", help="Print the composed config (job|hydra|all) and exit.")
RESOLVE = typer.Option(False, "--resolve", help="With --cfg: resolve interpolations.")
PACKAGE = typer.Option(None, "--package", "-p", help="With --cfg: print only this package (e.g. optim).")


def _fail(messages: list[str]) -> None:
    for m in messages:
        typer.echo(f"modrun: error: {m}", err=True)
    raise typer.Exit(2)


def _guard(fn: Callable[[], int | None]) -> None:
    """Bad input becomes one line per problem and exit code 2; a run's own exit code passes through."""
    try:
        code = fn()
    except UserError as e:
        _fail(e.messages)
    except WriteFailed as e:  # a full disk while writing a result: one line, exit code 1
        typer.echo(f"modrun: error: {e.message}", err=True)
        raise typer.Exit(1) from None
    raise typer.Exit(code or 0)


def _only_imports(args: list[str] | None) -> list[str]:
    """The modules of `+imports=[...]`, the only override that resume and reproduce take."""
    from modrun.core.registry import split_imports

    modules, rest = split_imports(list(args or []))
    if rest:
        raise UserError(f"'{rest[0]}': this command takes a folder and optionally +imports=[modules], nothing else")
    return modules


def _with_runs_dir(overrides: list[str] | None, runs_dir: Path | None) -> list[str]:
    return list(overrides or []) + ([f"runs_dir={runs_dir}"] if runs_dir else [])


def _add_run_command(command: str, help_text: str) -> None:
    """`modrun <command> [OVERRIDES]`: compose, validate and run one job of a pipeline (or print --cfg)."""

    def run(
        overrides: list[str] | None = OVERRIDES,
        config_dir: Path | None = CONFIG_DIR,
        runs_dir: Path | None = RUNS_DIR,
        cfg: str | None = CFG,
        resolve: bool = RESOLVE,
        package: str | None = PACKAGE,
    ) -> None:
        def go() -> int:
            from modrun.runner.launch import launch, show

            ovr = _with_runs_dir(overrides, runs_dir)
            if cfg is not None:
                show(command, ovr, config_dir, cfg, package, resolve)
                return 0
            if resolve or package:
                raise UserError("--resolve and --package only work together with --cfg")
            return launch(command, ovr, config_dir)

        _guard(go)

    run.__doc__ = help_text
    app.command(command, context_settings={"allow_extra_args": True})(run)


# one command per registered recipe (declared lazily: no torch imported here)
for _name, _summary in RECIPES.summaries(declared=True):
    _add_run_command(_name, _summary)


@app.command(context_settings={"allow_extra_args": True})
def sweep(
    command: str = typer.Argument(..., help="train, distill, prune, grow or stitch"),
    overrides: list[str] | None = OVERRIDES,
    config_dir: Path | None = CONFIG_DIR,
    runs_dir: Path | None = RUNS_DIR,
) -> None:
    """Hydra multirun of a command (a=1,2 range() glob() interval(); any launcher or sweeper) into one folder."""

    def go() -> int:
        from modrun.runner.sweep import run_sweep

        return run_sweep(command, _with_runs_dir(overrides, runs_dir), config_dir)

    _guard(go)


@app.command()
def validate(
    command: str = typer.Argument(..., help="train, distill, prune, grow or stitch"),
    overrides: list[str] | None = OVERRIDES,
    config_dir: Path | None = CONFIG_DIR,
) -> None:
    """Compose and validate a command's config, print it resolved; runs nothing."""

    def go() -> int:
        from modrun.runner.launch import check

        typer.echo(check(command, list(overrides or []), config_dir), nl=False)
        typer.echo(f"# {command} config is valid", err=True)
        return 0

    _guard(go)


IMPORTS = typer.Argument(None, help="+imports=[my_models]: the modules the run's config.yaml names, if you trust them")


@app.command(context_settings={"allow_extra_args": True})
def resume(
    run_dir: Path = typer.Argument(..., help="A run folder, or a sweep folder."), imports: list[str] | None = IMPORTS
) -> None:
    """Continue a run from its last checkpoint (identical result); for a sweep, its unfinished jobs."""

    def go() -> int:
        from modrun.runner.sweepresume import resume

        return resume(run_dir, _only_imports(imports))

    _guard(go)


@app.command(context_settings={"allow_extra_args": True})
def reproduce(run_dir: Path = typer.Argument(..., help="A run folder."), imports: list[str] | None = IMPORTS) -> None:
    """Re-run a run from its own record into a new folder; warn about changes; diff metrics and weights."""

    def go() -> int:
        from modrun.runner.reproduce import reproduce_run

        return reproduce_run(run_dir, _only_imports(imports))

    _guard(go)


@app.command("eval")
def evaluate(
    run_dir: Path = typer.Argument(..., help="A run folder."),
    overrides: list[str] | None = OVERRIDES,
    weights: str = typer.Option("final", help="final (model.safetensors) or best (checkpoints/best.pt)."),
    config_dir: Path | None = CONFIG_DIR,
) -> None:
    """Evaluate a run's weights, optionally on other data (e.g. data.image_size=16 or data=synthetic)."""

    def go() -> int:
        from modrun.commands.evaluate import evaluate_run

        evaluate_run(run_dir, list(overrides or []), weights, config_dir)
        return 0

    _guard(go)


@app.command()
def soup(
    runs_and_overrides: list[str] = typer.Argument(..., help="Run and/or sweep folders, then soup=greedy, ..."),
    runs_dir: Path | None = RUNS_DIR,
) -> None:
    """Merge the weights of compatible runs: soup=uniform (default), greedy or task_arithmetic (sparse runs keep
    their shared mask)."""

    def go() -> int:
        from modrun.recipes.soup import soup_runs

        return soup_runs(_with_runs_dir(runs_and_overrides, runs_dir))

    _guard(go)


@app.command("list")
def list_components(group: str | None = typer.Argument(None, help="models, datasets, optimizers, ...")) -> None:
    """Registered components, with a one-line description each."""

    def go() -> int:
        from modrun.commands.browse import list_registry

        list_registry(group)
        return 0

    _guard(go)


@runs_app.command("list")
def runs_list(runs_dir: Path = typer.Argument(Path("runs"), help="The runs folder.")) -> None:
    """One line per run folder: command, state, best and final metrics."""

    def go() -> int:
        from modrun.commands.browse import list_runs

        list_runs(runs_dir)
        return 0

    _guard(go)


@runs_app.command("compare")
def runs_compare(
    paths: list[Path] = typer.Argument(..., help="A sweep folder, or several run folders."),
    objective: str | None = typer.Option(
        None, help="Metric to rank by (default: the sweep's, else the task's: val/top1, or val/loss for text)."
    ),
    out: Path | None = typer.Option(None, help="Where compare.csv and the plots go (default: the sweep folder)."),
    plots: bool = typer.Option(True, help="Write curves.png and pareto.png (needs matplotlib)."),
) -> None:
    """Ranked table of runs (overrides that differ, metrics, mean ± std over seeds), CSV and plots."""

    def go() -> int:
        from modrun.runner.compare import compare

        compare(paths, objective, plots, out)
        return 0

    _guard(go)


@runs_app.command("show")
def runs_show(run_dir: Path = typer.Argument(..., help="A run folder.")) -> None:
    """Status, overrides, summary and the last metrics of one run."""

    def go() -> int:
        from modrun.commands.browse import show_run

        show_run(run_dir)
        return 0

    _guard(go)


def main() -> None:
    app(prog_name="modrun")


if __name__ == "__main__":
    sys.exit(main())
