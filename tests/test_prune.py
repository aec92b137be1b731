"""`modrun prune` through the real CLI, and the pruning maths."""

import json
from pathlib import Path

import pytest
import torch
from conftest import FAST, cli, read_json, read_metrics
from safetensors.torch import load_file

from modrun.methods.prune.unstructured import cubic_sparsity, lamp_scores

QUICK = ["trainer.epochs=1", "source.epochs=2", "model.width=16", "trainer.progress=false"]


def _runs(command: str) -> list[Path]:
    return sorted((Path("runs") / command).iterdir()) if (Path("runs") / command).exists() else []


def _sparsity(weights: dict, names: list[str]) -> float:
    zeros = sum(int((weights[n] == 0).sum()) for n in names)
    return zeros / sum(weights[n].numel() for n in names)


def test_lamp_scores_and_cubic_schedule_by_hand():
    w = torch.tensor([1.0, -2.0, 3.0])
    assert lamp_scores(w, torch.Generator()).tolist() == pytest.approx([1 / 14, 4 / 13, 1.0])
    assert cubic_sparsity(0, 0.0, 0.8, 0, 4, 10) == 0.0
    assert cubic_sparsity(20, 0.0, 0.8, 0, 4, 10) == pytest.approx(0.8 - 0.8 * 0.5**3)
    assert cubic_sparsity(40, 0.0, 0.8, 0, 4, 10) == pytest.approx(0.8)
    assert cubic_sparsity(99, 0.0, 0.8, 0, 4, 10) == pytest.approx(0.8)


def test_magnitude_trains_source_once_reports_cost_and_saves_sparse_weights():
    r = cli("prune", *QUICK, "prune.sparsity=0.6")
    assert r.code == 0, r.text
    assert "source: none given, training cnn_small first" in r.err
    assert "cost report" in r.err and "unstructured sparsity" in r.err
    run = _runs("prune")[0]
    summary = read_json(run / "summary.json")
    assert summary["dense"]["params"] == summary["pruned"]["params"]
    assert summary["pruned"]["nonzero_params"] < 0.45 * summary["dense"]["nonzero_params"]
    assert {"latency_ms_cpu_b1", "latency_ms_cpu_b64", "file_bytes", "macs"} <= summary["dense"].keys()
    weights = load_file(run / "model.safetensors")
    layers = [k for k in weights if k.endswith("weight") and weights[k].dim() in (2, 4)]
    assert _sparsity(weights, layers) == pytest.approx(0.6, abs=0.01)
    assert read_json(run / "source.json")["source"] == "trained"
    r = cli("prune", *QUICK, "prune=lamp", "prune.sparsity=0.9")
    assert r.code == 0 and "source: reusing" in r.err
    lamp = read_json(_runs("prune")[-1] / "summary.json")["layer_sparsity"]
    assert len(set(round(v, 2) for v in lamp.values())) > 1  # layer-adaptive: sparsities differ by layer


def test_layer_scope_and_exclude_patterns():
    r = cli("prune", *QUICK, "prune.scope=layer", "prune.sparsity=0.5", "prune.exclude=[fc]")
    assert r.code == 0, r.text
    summary = read_json(_runs("prune")[0] / "summary.json")
    assert "fc" not in summary["layer_sparsity"]
    assert all(v == pytest.approx(0.5, abs=0.01) for v in summary["layer_sparsity"].values())
    weights = load_file(_runs("prune")[0] / "model.safetensors")
    assert int((weights["fc.weight"] == 0).sum()) == 0


def test_gradual_magnitude_reaches_target_on_schedule():
    r = cli(
        "prune",
        *QUICK,
        "prune=gradual_magnitude",
        "prune.sparsity=0.8",
        "prune.every=5",
        "trainer.epochs=2",
        "prune.end=0.5",
    )
    assert r.code == 0, r.text
    run = _runs("prune")[0]
    summary = read_json(run / "summary.json")
    assert summary["pruned"]["nonzero_params"] < 0.3 * summary["dense"]["nonzero_params"]
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["extra"]["pruner"]["current"] == pytest.approx(0.8)
    r = cli("prune", "prune=gradual_magnitude", "recover=none")
    assert r.code == 2 and "prunes during training" in r.err


def test_channel_pruning_is_physically_smaller_and_reloads_everywhere():
    r = cli("prune", *QUICK, "prune=channel", "prune.ratio=0.5", "recover=distill", "kd=kd")
    assert r.code == 0, r.text
    run = _runs("prune")[0]
    shapes = json.loads((run / "model_shapes.json").read_text())
    assert shapes["features.0.0"]["out_channels"] == 8  # 16 -> 8
    assert "fc" in shapes and shapes["fc"]["out_features"] == 10  # the classifier keeps its classes
    summary = read_json(run / "summary.json")
    assert summary["pruned"]["params"] < 0.35 * summary["dense"]["params"]
    assert summary["pruned"]["file_bytes"] < 0.4 * summary["dense"]["file_bytes"]
    assert "kd_kd" in read_metrics(run)[0]
    r = cli("eval", str(run))
    assert r.code == 0 and f"{summary['final']['test/top1']:.2f}" in r.out
    assert cli("distill", *FAST, f"teacher.run={run}").code == 0  # a pruned run as a teacher
    assert cli("prune", *QUICK, f"source.run={run}", "prune=magnitude").code == 0  # and as a source


def test_source_from_checkpoint_and_bad_inputs():
    assert cli("train", *FAST).code == 0
    weights = sorted((Path("runs") / "train").iterdir())[0] / "model.safetensors"
    r = cli("prune", *QUICK, f"source.checkpoint={weights}")
    assert r.code == 0, r.text
    cases = {
        ("prune=magnitud",): "prune=magnitud: no such prune config — did you mean magnitude?",
        ("recover=finetun",): "did you mean finetune?",
        ("source.run=nowhere",): "source.run=nowhere: not a modrun run folder",
        ("prune.types=[Conv3d]",): "prune.types: unknown layer type Conv3d",
        ("+prune.ratio=0.3",): "prune.ratio: not an argument of pruner 'magnitude'",
        ("prune.sparsity=1.5",): "prune.sparsity=1.5: must be in [0, 1)",
        ("prune.include=[nothing*]",): "no Conv2d/Linear layer matches",
    }
    for overrides, message in cases.items():
        r = cli("prune", *QUICK, *overrides)
        assert r.code == 2 and message in r.err, (overrides, r.err)
        assert "Traceback" not in r.text
    assert len(_runs("prune")) == 1


def test_imp_rounds_rewind_and_reach_target():
    r = cli("prune", *QUICK, "prune=imp", "prune.rounds=2", "prune.sparsity=0.75", "prune.rewind_step=3")
    assert r.code == 0, r.text
    run = _runs("prune")[0]
    summary = read_json(run / "summary.json")
    sparsities = [h["sparsity"] for h in summary["imp_rounds"]]
    assert sparsities == pytest.approx([0.0, 0.5, 0.75], abs=0.01)  # survivors halve each round
    assert (run / "checkpoints" / "imp_rewind.pt").exists()
    assert {m.get("phase") for m in read_metrics(run)} == {"imp_round0", "imp_round1", "imp_round2"}
    weights = load_file(run / "model.safetensors")
    layers = [k for k in weights if k.endswith("weight") and weights[k].dim() in (2, 4)]
    assert _sparsity(weights, layers) == pytest.approx(0.75, abs=0.01)


def test_sensitivity_writes_table_plot_and_suggestion():
    r = cli("prune", *QUICK, "prune=sensitivity", "prune.sparsities=[0.5,0.9]", "prune.target=0.6")
    assert r.code == 0, r.text
    run = _runs("prune")[0]
    rows = (run / "sensitivity.csv").read_text().splitlines()
    assert rows[0] == "layer,sparsity,val_top1,params" and len(rows) == 1 + 4 * 2
    assert (run / "sensitivity.png").stat().st_size > 1000
    summary = read_json(run / "summary.json")
    assert summary["suggested_overall_sparsity"] >= 0.6
    assert set(summary["suggested_sparsity"]) == {"features.0.0", "features.1.0", "features.3.0", "fc"}


def test_gradual_schedule_counts_optimiser_steps_with_accumulation():
    """With 4 batches per step the run takes a quarter of the steps: the schedule must end on the run's steps."""
    r = cli(
        "prune", *QUICK, "prune=gradual_magnitude", "prune.sparsity=0.8", "prune.every=1", "prune.end=0.9",
        "trainer.epochs=1", "trainer.accumulate_grad_batches=4",
    )  # fmt: skip
    assert r.code == 0, r.text
    ckpt = torch.load(_runs("prune")[0] / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["extra"]["pruner"]["current"] == pytest.approx(0.8)
