"""`modrun grow` through the real CLI (stack, net2wider, resume after a kill, eval, bad input), and the maths."""

import json
from pathlib import Path

import pytest
import torch
from conftest import cli, only_run, read_json
from omegaconf import OmegaConf
from test_resume import _kill_and_resume, _killed_mid_run

from modrun.core.registry import MODELS
from modrun.methods.grow import grown_node
from modrun.methods.grow.net2net import net2wider
from modrun.methods.grow.stack import make_identity, plan, stack

QUICK = ["trainer.epochs=1", "source.epochs=2", "model.width=8", "trainer.progress=false"]
RESNET = ["model=resnet20", "model.width=0.25", "trainer.epochs=1", "trainer.progress=false"]


def _build(node: dict) -> torch.nn.Module:
    return MODELS.get(node["name"])(**{k: v for k, v in node.items() if k != "name"})


def _with_bn_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """BatchNorm running statistics away from their defaults, so copying them is tested too."""
    torch.manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(32, 1, 8, 8) * 2 + 0.5)
    return model.eval()


@pytest.mark.parametrize(
    "node,factor",
    [
        ({"name": "cnn_small", "in_channels": 1, "num_classes": 10, "width": 8}, 2.0),
        ({"name": "cnn_small", "in_channels": 1, "num_classes": 10, "width": 8}, 1.5),
        ({"name": "resnet20", "in_channels": 1, "num_classes": 10, "width": 0.25}, 2.0),
        ({"name": "resnet20", "in_channels": 1, "num_classes": 10, "width": 0.5}, 1.5),
    ],
)
def test_net2wider_keeps_the_logits(node, factor):
    source = _with_bn_statistics(_build(node))
    x = torch.randn(64, 1, 8, 8)
    for noise in (0.0, 0.2):
        g = OmegaConf.create({"name": "net2wider", "factor": factor, "noise": noise})
        grown = _build(grown_node("net2wider", node, g)).eval()
        net2wider(source, grown, g, seed=0)
        assert sum(p.numel() for p in grown.parameters()) > 1.5 * sum(p.numel() for p in source.parameters())
        torch.testing.assert_close(grown(x), source(x), atol=1e-4, rtol=0)
    copies = grown.fc.weight[:, source.fc.in_features :]  # noise > 0: the copies' shares differ
    assert copies.abs().sum() > 0


def test_net2wider_is_seeded_and_stack_orders():
    node = {"name": "cnn_small", "in_channels": 1, "num_classes": 10, "width": 4}
    source, g = _build(node), OmegaConf.create({"name": "net2wider", "factor": 2.0, "noise": 0.0})
    a, b, c = (_build(grown_node("net2wider", node, g)) for _ in range(3))
    net2wider(source, a, g, 0), net2wider(source, b, g, 0), net2wider(source, c, g, 1)
    assert torch.equal(a.features[0][0].weight, b.features[0][0].weight)
    assert not torch.equal(a.features[0][0].weight, c.features[0][0].weight)
    assert plan(3, 2, "repeat") == [0, 1, 2, 0, 1, 2] and plan(3, 2, "interleave") == [0, 0, 1, 1, 2, 2]
    block = MODELS.get("resnet20")(1, 10, 0.25).layers[1][1]
    make_identity(block)
    x = torch.rand(4, 8, 4, 4)  # post-ReLU inputs, as a block gets them
    torch.testing.assert_close(block.eval()(x), x)


def test_stack_copies_blocks_in_order_and_identity_for_transitions():
    node = {"name": "resnet20", "in_channels": 1, "num_classes": 10, "width": 0.25}
    source = _with_bn_statistics(_build(node))
    g = OmegaConf.create({"name": "stack", "factor": 2, "order": "repeat"})
    gn = grown_node("stack", node, g)
    assert gn["name"] == "resnet" and gn["depth"] == 38
    grown = _build(gn)
    copies = stack(source, grown, g, 0)["copies"]
    assert copies["layers.0.3"] == "layers.0.0" and copies["layers.1.3"] == "identity"
    assert copies["layers.2.5"] == "layers.2.2"
    assert torch.equal(grown.layers[2][4].conv1.weight, source.layers[2][1].conv1.weight)
    assert not grown.layers[1][3].bn2.weight.any()


def test_net2wider_cnn_small_keeps_accuracy_trains_evals_and_resumes_from_grown_weights():
    r = cli("grow", *QUICK)
    assert r.code == 0, r.text
    assert "source: none given, training cnn_small first" in r.err and "before training" in r.err
    run = only_run("grow")
    s = read_json(run / "summary.json")
    before, source = s["grown_before_training"], s["source"]
    assert before["val/top1"] == source["val/top1"] and before["test/top1"] == source["test/top1"]
    assert before["val/loss"] == pytest.approx(source["val/loss"], abs=1e-4)
    assert s["params"] == before["params"] > 3 * source["params"] and s["macs"] > 0 and "test/top1" in s["final"]
    cfg = OmegaConf.load(run / "config.yaml")
    assert cfg.model.width == 16 and cfg.source.model.width == 8  # rebuildable: the grown model under `model`
    r = cli("eval", str(run))
    assert r.code == 0 and f"{s['final']['test/top1']:.2f}" in r.out

    # killed right after the growth step, before any checkpoint: the resume starts from grown.safetensors
    weights = (run / "model.safetensors").read_bytes()
    for name in ("model.safetensors", "summary.json", "metrics.jsonl"):
        (run / name).unlink()
    for path in (run / "checkpoints").glob("*.pt*"):
        path.unlink()
    (run / "status.json").write_text(json.dumps({**read_json(run / "status.json"), "state": "interrupted"}))
    r = cli("resume", str(run))
    assert r.code == 0 and "grown model from checkpoints/grown.safetensors" in r.err, r.text
    assert (run / "model.safetensors").read_bytes() == weights

    # a grow run is a source like any other (its config.yaml describes the grown model); a cnn cannot be stacked
    r = cli("grow", *QUICK, f"source.run={run}", "grow=stack")
    assert r.code == 2 and "grow=stack cannot grow model 'cnn_small'" in r.err and "resnet20" in r.err, r.err


def test_resnet20_net2wider_keeps_accuracy_and_stack_doubles_depth():
    assert cli("train", *RESNET).code == 0
    source = only_run("train")
    r = cli("grow", *RESNET, f"source.run={source}", "grow=net2wider")
    assert r.code == 0, r.text
    s = read_json(only_run("grow") / "summary.json")
    assert s["grown_before_training"]["test/top1"] == s["source"]["test/top1"]
    assert s["grow"]["max_abs_logit_diff"] < 1e-4

    r = cli("grow", *RESNET, f"source.run={source}", "grow=stack")
    assert r.code == 0, r.text
    run = next(Path("runs/grow").glob("*_stack"))
    s = read_json(run / "summary.json")
    assert s["grow"]["grown_model"]["name"] == "resnet" and s["grow"]["grown_model"]["depth"] == 38
    assert 1.8 < s["params"] / s["source"]["params"] < 2.1  # every block twice, stem and classifier once
    assert OmegaConf.load(run / "config.yaml").model.depth == 38
    assert {"val/top1", "test/top1", "params"} <= s["grown_before_training"].keys()
    r = cli("eval", str(run))
    assert r.code == 0 and f"{s['final']['test/top1']:.2f}" in r.out


def test_bad_inputs_are_one_line_and_leave_no_run():
    cases = {
        ("grow=stak",): "grow=stak: no such grow config — did you mean stack?",
        ("grow=stack",): "grow=stack cannot grow model 'cnn_small'",
        ("model=mlp",): "grow=net2wider cannot grow model 'mlp'",
        ("model=resnet20", "grow=stack", "grow.factor=0"): "grow.factor=0: must be a number >= 1",
        ("model=resnet20", "grow=stack", "grow.factor=1.5"): "grow.factor=1.5: expects an integer",
        ("grow.factor=0.5",): "grow.factor=0.5: must be a number >= 1",
        ("model.width=16", "grow.factor=1.3"): "cnn_small' at width 16 x 1.3 gives 20.8 channels, not a whole number",
        ("model=resnet20", "grow=stack", "grow.order=zigzag"): "grow.order=zigzag: expected repeat or interleave",
        ("grow=stack", "grow.ordr=interleave"): "unknown key grow.ordr — did you mean grow.order?",
        ("source.run=nowhere",): "source.run=nowhere: not a modrun run folder",
    }
    for overrides, message in cases.items():
        r = cli("grow", "trainer.progress=false", *overrides)
        assert r.code == 2 and message in r.err, (overrides, r.err)
        assert "Traceback" not in r.text and len(r.err.strip().splitlines()) == 1, r.err
    assert not Path("runs").exists()
    r = cli("validate", "grow", "model=resnet20", "grow=stack")
    assert r.code == 0 and "order: repeat" in r.out


# slows training steps down from the environment, so that a kill lands mid-run (imported only in subprocesses)
SLOW_PLUGIN = """
import os, time
from modrun.components.models.cnn import SmallCNN
_forward = SmallCNN.forward
def forward(self, x):
    if self.training:
        time.sleep(float(os.environ.get("SLOW", "0")))
    return _forward(self, x)
SmallCNN.forward = forward
"""


def test_sigkill_then_resume_is_identical(tmp_path):
    assert cli("train", "trainer.epochs=1", "model.width=8", "trainer.progress=false").code == 0
    source = only_run("train").resolve()
    (tmp_path / "slowgrow.py").write_text(SLOW_PLUGIN)
    args = [
        f"source.run={source}",
        "+imports=[slowgrow]",
        "trainer.epochs=2",
        "trainer.checkpoint_every_steps=4",
        "trainer.log_every_steps=1",
        "trainer.progress=false",
        "grow.noise=0.1",
        "data.augment.crop_padding=1",
    ]
    # mid-epoch 2 (20 steps an epoch)
    run, reference = _kill_and_resume(tmp_path, "grow", args, 30, slow=0.02, killed=_killed_mid_run)
    assert (
        read_json(run / "summary.json")["grown_before_training"]
        == read_json(reference / "summary.json")["grown_before_training"]
    )
