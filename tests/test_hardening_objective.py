"""Hardening (issue #15.12): a sweep's objective, and `runs compare --objective`, must name a metric the runs
write (exit 2 naming the closest one); interval() with the grid sweeper says it needs optuna."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import FAST, cli, only_run, read_json
from omegaconf import OmegaConf

from modrun.core.summary import flatten_summary
from modrun.runner.objective import objective_names

TINY_LM = ["model=gpt", "data=python_docs", "model.n_layer=1", "model.n_embd=32", "model.n_head=2"]
QUICK_PRUNE = ["trainer.epochs=1", "source.epochs=1", "model.width=8", "trainer.progress=false"]


def _one_error(r, *fragments: str) -> str:
    assert r.code == 2 and "Traceback" not in r.text, r.text
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modrun: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("objective", "closest"),
    [
        ("val/acc", "val/top1"),
        ("val/accuracy", "val/top1"),
        ("val/los", "val/loss"),
        ("best/vall/top1", "best/val/top1"),
    ],
)
def test_a_sweep_objective_no_run_writes_is_refused(objective: str, closest: str) -> None:
    _one_error(cli("sweep", "train", *FAST, f"sweep.objective={objective}", "seed=0,1"), objective, closest)
    assert not Path("runs").exists()


def test_a_language_model_sweep_knows_its_own_metrics() -> None:
    """val/ppl is a metric of language modeling, not of image classification."""
    _one_error(cli("sweep", "train", *FAST, "sweep.objective=val/ppl", "seed=0,1"), "val/ppl")
    r = cli("validate", "train", *TINY_LM)
    assert r.code == 0, r.text
    names = objective_names("train", OmegaConf.create(r.out))
    assert {"val/ppl", "val/bpb", "best/val/loss", "best/test/bpb"} <= set(names) and "val/top5" not in names
    assert "best/val/bpb" not in names  # the best epoch records only the metric that chose it (val loss)
    _one_error(cli("sweep", "train", *FAST, "sweep.objective=best/val/loss", "seed=0,1"), "best/val/loss")


def test_interval_with_the_grid_sweeper_says_it_needs_optuna() -> None:
    _one_error(cli("sweep", "train", *FAST, "optim.lr=interval(0.01,0.1)"), "interval", "hydra/sweeper=optuna")
    assert not Path("runs").exists()


def test_compare_by_a_metric_no_run_has_is_refused() -> None:
    assert cli("sweep", "train", *FAST, "seed=0,1").code == 0
    sweep = next(Path("runs/sweeps").iterdir())
    _one_error(cli("runs", "compare", str(sweep), "--objective", "val/acc"), "val/acc", "did you mean val/top1?")
    assert cli("runs", "compare", str(sweep), "--objective", "test/top1").code == 0


@pytest.mark.parametrize(
    ("command", "overrides"),
    [
        ("train", FAST),
        ("train", [*TINY_LM, "trainer.epochs=1", "trainer.progress=false"]),
        ("distill", [*FAST, "teacher.width=8", "teacher.epochs=1"]),
        ("prune", QUICK_PRUNE),
        ("prune", [*QUICK_PRUNE, "prune=sensitivity", "prune.sparsities=[0.5]"]),
    ],
    ids=["train", "train-lm", "distill", "prune", "prune-sensitivity"],
)
def test_every_number_a_run_writes_is_an_objective_a_sweep_accepts(command: str, overrides: list[str]) -> None:
    """The list the check uses is not allowed to drift from what the recipes really write."""
    r = cli(command, *overrides)
    assert r.code == 0, r.text
    run = only_run(command)
    numbers = {k for k, v in flatten_summary(read_json(run / "summary.json")).items() if isinstance(v, (int, float))}
    cfg = OmegaConf.load(run / "config.yaml")
    assert numbers - set(objective_names(command, cfg)) == set()
