"""`modrun stitch` through the real CLI (two cnn_small anchors, bad input, resume after SIGKILL), and the maths."""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import cli, only_run, read_json
from omegaconf import OmegaConf
from test_resume import _kill_and_resume, _killed_mid_run

from modrun.core.registry import MODELS
from modrun.methods.stitch.net import boundary_features, build, least_squares

QUICK = ["trainer.epochs=1", "trainer.progress=false"]


@pytest.fixture(scope="module")
def anchors(tmp_path_factory) -> tuple[Path, Path]:
    """Two completed cnn_small runs (width 8 and 16, 1 epoch), shared by the tests of this file."""
    root = tmp_path_factory.mktemp("anchors")
    for width in (8, 16):
        r = cli("train", "--runs-dir", str(root / f"w{width}"), *QUICK, f"model.width={width}")
        assert r.code == 0, r.text
    return only_run("train", root / "w8"), only_run("train", root / "w16")


def _trained(name: str, *args) -> torch.nn.Module:
    """A model with BatchNorm statistics away from their defaults, in eval mode."""
    torch.manual_seed(1)
    model = MODELS.get(name)(1, 10, *args).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(32, 1, 8, 8) * 2 + 0.5)
    return model.eval()


@pytest.mark.parametrize("name,width", [("cnn_small", 8), ("resnet20", 0.25)])
def test_stages_compose_to_forward_and_identical_anchors_stitch_to_identity(name, width):
    model, x = _trained(name, width), torch.randn(64, 1, 8, 8)
    y = x
    for stage in model.stages():
        y = stage(y)
    assert torch.equal(y, model(x))
    points = list(range(len(model.stages()) - 1))
    net = build(model, copy.deepcopy(model), points, x)
    for k in points:
        w = net.stitches[str(k)].weight.detach().flatten(1)
        torch.testing.assert_close(w, torch.eye(len(w)), atol=1e-4, rtol=0)
        torch.testing.assert_close(net(x, k), model(x), atol=1e-4, rtol=0)


def test_least_squares_beats_a_random_start():
    small, large, x = _trained("cnn_small", 4), _trained("cnn_small", 16), torch.randn(128, 1, 8, 8)
    fs, fl = boundary_features(small, x), boundary_features(large, x)
    for k in range(3):
        w, b = least_squares(fs[k], fl[k])
        fitted = torch.nn.functional.conv2d(fs[k], w, b)
        random = torch.nn.Conv2d(fs[k].shape[1], fl[k].shape[1], 1)(fs[k]).detach()
        assert ((fitted - fl[k]) ** 2).mean() < 0.5 * ((random - fl[k]) ** 2).mean()


def test_stitch_two_cnn_small_anchors(anchors):
    small, large = anchors
    r = cli("stitch", f"anchors=[{large},{small}]", *QUICK)  # either order: the smaller anchor is the front
    assert r.code == 0, r.text
    run = only_run("stitch")
    s = read_json(run / "summary.json")
    rows = s["stitches"]
    assert [r["params"] for r in rows] == sorted(r["params"] for r in rows) and len(rows) == 3 + 2
    by = {r["model"]: r for r in rows}
    assert {"small", "large", "stitch@0", "stitch@1", "stitch@2"} == by.keys()
    assert by["small"]["test/top1"] == read_json(small / "summary.json")["final"]["test/top1"]
    assert by["large"]["params"] == read_json(large / "summary.json")["params"]
    record = json.loads((run / "stitch.json").read_text())
    assert record["small"]["run"] == str(small) and record["points"] == [0, 1, 2]
    for k in range(3):
        cs, cl = record["channels"][str(k)]
        # a stitched model uses the small front, the stitch (cs -> cl, with bias) and the large back: its size lies
        # between the anchors' (up to the stitch itself, which stitching at point 0 adds on top of the large anchor)
        assert by["small"]["params"] < by[f"stitch@{k}"]["params"] <= by["large"]["params"] + cs * cl + cl
        assert by[f"stitch@{k}"]["macs"] > by["small"]["macs"] and 0 <= by[f"stitch@{k}"]["test/top1"] <= 100
    assert by["stitch@2"]["params"] < by["stitch@1"]["params"] < by["stitch@0"]["params"]
    from safetensors.torch import load_file

    keys = [f"stitches.{k}.{p}" for k in range(3) for p in ("bias", "weight")]
    assert sorted(load_file(run / "model.safetensors")) == keys
    assert s["final"]["test/top1"] >= 0 and (run / "checkpoints" / "last.pt").exists()
    r = cli("eval", str(run))  # the eval point (what `final` records), then one point of the run's choosing
    assert r.code == 0 and f"{s['final']['test/top1']:.2f}" in r.out and record["eval_point"] == 1, r.text
    r = cli("eval", str(run), "stitch.point=2")
    assert r.code == 0 and f"{by['stitch@2']['test/top1']:.2f}" in r.out, r.text
    r = cli("eval", str(run), "stitch.point=5")
    assert r.code == 2 and "stitch.point=5: the run stitched at points [0, 1, 2]" in r.err
    r = cli("stitch", f"anchors=[{small},{large}]", *QUICK, "stitch.points=[2]", "trainer.epochs=0")
    assert r.code == 0, r.text
    assert len(read_json(sorted(Path("runs/stitch").iterdir())[-1] / "summary.json")["stitches"]) == 3


def _fake(src: Path, dest: Path, **changes) -> Path:
    """A copy of an anchor run whose config.yaml is changed (dotted key -> value)."""
    shutil.copytree(src, dest)
    cfg = OmegaConf.load(dest / "config.yaml")
    for key, value in changes.items():
        OmegaConf.update(cfg, key.replace("__", "."), value)
    (dest / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return dest


def test_bad_inputs_are_one_line_and_leave_no_run(anchors, tmp_path):
    small, large = anchors
    mlp = _fake(small, tmp_path / "mlp", model__name="mlp")
    resnet = _fake(small, tmp_path / "resnet", model__name="resnet20", model__width=0.25)
    big_images = _fake(large, tmp_path / "big", data__image_size=16)
    cases = {
        (f"anchors=[{small}]",): "give exactly two run folders",
        (f"anchors={small}",): "give exactly two run folders",
        (f"anchors=[{small},nowhere]",): "anchors: nowhere is not a modrun run folder (no config.yaml)",
        (f"anchors=[{small},{resnet}]",): "different model families (cnn_small vs resnet20)",
        (f"anchors=[{small},{mlp}]",): "cannot stitch model 'mlp'",
        (f"anchors=[{small},{big_images}]",): "trained on other data (data.image_size 16 vs 8)",
        (f"anchors=[{small},{small}]",): "both are the same architecture",
        (f"anchors=[{small},{large}]", "stitch.points=[3]"): "cnn_small has stitch points 0..2",
        (f"anchors=[{small},{large}]", "stitch.pionts=[1]"): "did you mean stitch.points?",
        (f"anchors=[{small},{large}]", "data.image_size=16"): "(data.image_size 8 vs 16)",
    }
    for overrides, message in cases.items():
        r = cli("stitch", "trainer.progress=false", *overrides)
        assert r.code == 2 and message in r.err, (overrides, r.err)
        assert "Traceback" not in r.text and len(r.err.strip().splitlines()) == 1, r.err
    assert not Path("runs").exists()


# slows the stitched network's training steps from the environment, so that a kill lands mid-run
SLOW_PLUGIN = """
import os, time
from modrun.methods.stitch.net import StitchNet
_forward = StitchNet.forward
def forward(self, x, point=None):
    if self.training:
        time.sleep(float(os.environ.get("SLOW", "0")))
    return _forward(self, x, point)
StitchNet.forward = forward
"""


def test_sigkill_then_resume_is_identical(anchors, tmp_path):
    (tmp_path / "slowstitch.py").write_text(SLOW_PLUGIN)
    args = [f"anchors=[{anchors[0]},{anchors[1]}]", "+imports=[slowstitch]", "trainer.epochs=2"]
    args += ["trainer.checkpoint_every_steps=4", "trainer.log_every_steps=1", "trainer.progress=false"]
    # mid-epoch 2 (20 steps an epoch)
    run, reference = _kill_and_resume(tmp_path, "stitch", args, 30, slow=0.02, killed=_killed_mid_run)

    def drop_latency(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "latency_ms_batch1"} for r in rows]

    a, b = read_json(run / "summary.json"), read_json(reference / "summary.json")
    assert drop_latency(a["stitches"]) == drop_latency(b["stitches"])


def test_anchors_given_as_configs_are_trained_first_once_and_reused():
    """Anchors may be model configs: each is trained first on the stitch run's data (the user's own identical
    `modrun train` is reused), recorded in prerequisites.json, and a second stitch trains nothing new."""
    assert cli("train", *QUICK, "model.width=8").code == 0  # the user's own run of the small anchor
    own = only_run("train")
    anchors = "anchors=[{model:{name:cnn_small,width:8},epochs:1},{model:{name:cnn_small,width:16},epochs:1}]"
    r = cli("stitch", anchors, *QUICK)
    assert r.code == 0, r.text
    trained = sorted(p for p in (Path("runs") / "train").iterdir())
    assert len(trained) == 2 and own in trained
    large = next(p for p in trained if p != own)
    assert OmegaConf.load(large / "config.yaml").model.width == 16
    run = only_run("stitch")
    records = read_json(run / "prerequisites.json")
    assert [(rec["role"], rec["key"], rec["how"]) for rec in records] == [
        ("anchor", "anchors.0", "reused"),
        ("anchor", "anchors.1", "trained"),
    ]
    stitched = read_json(run / "stitch.json")
    assert (stitched["small"]["run"], stitched["large"]["run"]) == (str(own), str(large))
    assert OmegaConf.load(run / "config.yaml").anchors[1].model.width == 16  # as given: a re-run finds the same runs
    assert cli("stitch", anchors, *QUICK).code == 0
    assert len(list((Path("runs") / "train").iterdir())) == 2


def test_bad_anchor_configs_are_clear_errors():
    bad = [
        ("anchors=[{model:cnn_small,epoch:1},{model:cnn_small}]", "anchors.0.epoch: unknown key"),
        ("anchors=[{model:{name:cnn_small,widt:8}},{model:cnn_small}]", "did you mean width?"),
        ("anchors=[{model:mlp},{model:cnn_small}]", "anchors.0: cannot stitch model 'mlp'"),
    ]
    for arg, message in bad:
        r = cli("stitch", arg, *QUICK)
        assert r.code == 2 and message in r.text, r.text
    assert not Path("runs").exists()
