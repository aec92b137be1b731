"""Pinned numbers for a fixed seed (torchtune style): a refactor that changes the maths shows up here."""

from pathlib import Path

import pytest
from conftest import FAST, cli, only_run, read_json, read_metrics


def test_pinned_losses_for_seed_0():
    assert cli("train", *FAST, "seed=0", "trainer.log_every_steps=10").code == 0
    run = only_run()
    losses = [round(m["loss"], 4) for m in read_metrics(run) if m["split"] == "train"]
    final = read_json(run / "summary.json")["final"]
    assert losses == pytest.approx(PINNED_LOSSES, abs=2e-3), losses
    assert final["test/top1"] == pytest.approx(PINNED_TEST_TOP1, abs=0.6), final


def test_same_seed_same_result_and_other_seed_differs():
    for seed in (1, 1, 2):
        assert cli("train", *FAST, f"seed={seed}", "name=s", "--runs-dir", f"runs{seed}").code == 0
    runs = {s: sorted((Path(f"runs{s}") / "train").iterdir()) for s in (1, 2)}
    a, b = runs[1]
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (runs[2][0] / "model.safetensors").read_bytes()


PINNED_LOSSES = [1.2255, 0.3063, 0.3077, 0.3559]
PINNED_TEST_TOP1 = 97.21
