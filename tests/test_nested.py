"""Nested training (`nested=sorted`, `nested=matryoshka`) through the real CLI: every size reported, one
size cut out as a physically smaller model, exact resume, bad input."""

import json
from pathlib import Path

import pytest
import torch
from conftest import FAST, cli, only_run, read_json
from safetensors.torch import load_file
from test_resume import ARGS, PLUGIN, _kill_and_resume

from modrun.components.models.cnn import cnn_small
from modrun.components.models.resnet import resnet20
from modrun.methods.nested import subnet
from modrun.methods.nested.base import prefix_logits, slim
from modrun.methods.nested.subnet import cut, extract


def _trained_bn(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    model.train()
    for _ in range(3):  # BatchNorm statistics that are not the initial ones
        model(x)
    return model.eval()


@pytest.mark.parametrize(
    "build, depths",
    [(lambda: cnn_small(1, 10, width=16), (1.0,)), (lambda: resnet20(3, 10, width=0.5), (0.34, 0.5, 1.0))],
)
def test_a_masked_size_computes_what_its_cut_out_copy_computes(build, depths):
    torch.manual_seed(0)
    model = build()
    x = torch.randn(4, next(model.parameters()).shape[1], 8, 8)
    _trained_bn(model, x)
    for width in (0.25, 0.5, 1.0):
        for depth in depths:
            small, _ = extract(model, width, x.shape[1], depth)
            with torch.no_grad(), slim(model, width, depth):
                torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)
            if depth < 1:  # resnet20 has 3 blocks per stage: depth 0.34 keeps 1, 0.5 keeps 2
                assert [len(stage) for stage in small.layers] == [round(3 * depth + 1e-9)] * 3
    if depths != (1.0,):  # slim put the dropped blocks back
        assert [len(stage) for stage in model.layers] == [3, 3, 3]
    assert sum(p.numel() for p in extract(model, 0.5, x.shape[1])[0].parameters()) < sum(
        p.numel() for p in model.parameters()
    )


def test_smaller_sizes_leave_the_batchnorm_statistics_to_the_full_model():
    # so validation during training and the checkpoints measure the full model with its own statistics
    model, x = resnet20(1, 10, width=0.5).train(), torch.randn(8, 1, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    with torch.no_grad():
        for width, depth in ((0.5, 1.0), (1.0, 0.34), (0.25, 0.67)):
            with slim(model, width, depth):
                model(x)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with torch.no_grad():
        model(x)  # the full model's own forward does update them
    assert not torch.equal(before["stem.1.running_mean"], model.state_dict()["stem.1.running_mean"])


@pytest.mark.parametrize("build", [lambda: cnn_small(1, 10, width=16), lambda: resnet20(1, 10, width=0.5)])
def test_a_cut_out_matryoshka_size_computes_its_prefix_logits(build):
    torch.manual_seed(0)
    model = build()
    x = torch.randn(4, 1, 8, 8)
    _trained_bn(model, x)
    feats = {}
    handle = model.fc.register_forward_pre_hook(lambda m, inputs: feats.update(x=inputs[0]))
    with torch.no_grad():
        model(x)
        handle.remove()
        for dim in (4, 16):
            small, shapes = cut(model, dim, 1)
            torch.testing.assert_close(small(x), prefix_logits(model.fc, feats["x"], dim), rtol=1e-5, atol=1e-5)
            assert small.fc.in_features == dim
    # cnn_small's last conv makes the embedding channel for channel, so it shrinks too; a resnet's is a residual sum
    assert ("features.3.0" in shapes) == isinstance(model, type(cnn_small(1, 10)))


def test_any_model_with_a_linear_fc_cuts_to_a_prefix():
    class Plain(torch.nn.Module):  # a user's model: its forward knows nothing of nested sizes
        def __init__(self) -> None:
            super().__init__()
            self.body, self.fc = torch.nn.Linear(64, 32), torch.nn.Linear(32, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.body(x.flatten(1))))

    model, x = Plain(), torch.randn(3, 1, 8, 8)
    small, _ = cut(model, 8, 1)
    with torch.no_grad():
        torch.testing.assert_close(small(x), prefix_logits(model.fc, torch.relu(model.body(x.flatten(1))), 8))
    assert small.fc.weight.shape == (10, 8)


def test_sorted_run_reports_every_width_and_cuts_one_out():
    r = cli("train", *FAST, "trainer.epochs=2", "nested=sorted", "kd=kd")
    assert r.code == 0, r.text
    run = only_run()
    rows = read_json(run / "summary.json")["nested"]
    assert [row["width"] for row in rows] == [0.25, 0.5, 0.75, 1.0] and {row["depth"] for row in rows} == {1.0}
    params = [row["params"] for row in rows]
    assert params == sorted(params) and len(set(params)) == 4
    # width 0.5 of a 16-wide cnn_small is exactly an 8-wide one
    assert rows[1]["params"] == sum(p.numel() for p in cnn_small(1, 10, width=8).parameters())
    assert json.loads((run / "nested.json").read_text()) == rows and (run / "nested.png").stat().st_size > 1000
    assert all(0 <= row["test/top1"] <= 100 for row in rows) and rows[-1]["test/top1"] > 80
    metrics = (run / "metrics.jsonl").read_text()  # in place, the full model teaches every smaller width
    assert all(f"{term}_w0.25" in metrics for term in ("ce", "kd")) and "kd_w1" not in metrics

    r = cli("eval", str(run), "nested.width=0.5")
    assert r.code == 0, r.text
    evaluated = json.loads((run / "evals.jsonl").read_text().splitlines()[-1])
    assert evaluated["nested"] == {"width": 0.5, "depth": 1.0}
    assert evaluated["test/top1"] == pytest.approx(rows[1]["test/top1"])
    # the saved sub-network is a standalone model: an 8-wide cnn_small loads it as it is
    saved = run / "nested" / "w0.5"
    assert (saved / "model_shapes.json").is_file()
    small = cnn_small(1, 10, width=8)
    small.load_state_dict(load_file(saved / "model.safetensors"))


def test_sorted_depths_train_every_width_and_depth_and_cut_a_shallower_resnet_out():
    args = ["model=resnet20", "model.width=0.5", "nested=sorted", "nested.widths=[0.5]", "nested.depths=[0.34,0.67]"]
    r = cli("train", *FAST[2:], "trainer.epochs=2", *args)
    assert r.code == 0, r.text
    run = only_run()
    rows = read_json(run / "summary.json")["nested"]
    assert [(row["width"], row["depth"]) for row in rows] == [(w, d) for w in (0.5, 1.0) for d in (0.34, 0.67, 1.0)]
    for w in (0.5, 1.0):  # fewer blocks, fewer parameters and MACs
        same = [row for row in rows if row["width"] == w]
        assert [r["params"] for r in same] == sorted({r["params"] for r in same})
        assert [r["macs"] for r in same] == sorted({r["macs"] for r in same})
    assert "ce_w0.5_d0.34" in (run / "metrics.jsonl").read_text() and rows[-1]["test/top1"] > 50

    r = cli("eval", str(run), "nested.depth=0.34", "nested.width=0.5")
    assert r.code == 0, r.text
    evaluated = json.loads((run / "evals.jsonl").read_text().splitlines()[-1])
    assert evaluated["nested"] == {"width": 0.5, "depth": 0.34}
    assert evaluated["test/top1"] == pytest.approx(rows[0]["test/top1"])
    # one block per stage: built from its model.yaml as a resnet8, then the shapes, then the weights
    small = subnet.load(run / "nested" / "w0.5_d0.34")
    assert [len(stage) for stage in small.layers] == [1, 1, 1]
    assert sum(p.numel() for p in small.parameters()) == rows[0]["params"]


def test_matryoshka_run_trains_nested_prefixes_of_the_embedding():
    r = cli("train", *FAST, "trainer.epochs=2", "nested=matryoshka", "nested.dims=[4,16,64]")
    assert r.code == 0, r.text
    run = only_run()
    rows = read_json(run / "summary.json")["nested"]
    assert [row["dim"] for row in rows] == [4, 16, 64]
    assert rows[0]["params"] < rows[-1]["params"]
    r = cli("eval", str(run), "nested.dim=16")
    assert r.code == 0, r.text
    assert json.loads((run / "evals.jsonl").read_text().splitlines()[-1])["test/top1"] == pytest.approx(
        rows[1]["test/top1"]
    )
    # physically smaller: the classifier and the last conv keep 16 of their 64 channels
    small = subnet.load(run / "nested" / "d16")
    assert small.fc.in_features == 16 and small.features[3][0].out_channels == 16
    assert sum(p.numel() for p in small.parameters()) == rows[1]["params"] < rows[2]["params"]


def test_sampled_widths_resume_bitwise(tmp_path):
    (tmp_path / "slowplugin.py").write_text(PLUGIN)
    args = [*ARGS, "trainer.epochs=2", "nested=sorted", "nested.mode=sample", "nested.widths=[0.25,0.5,0.75]"]
    run, reference = _kill_and_resume(tmp_path, "train", args, 25, slow=0.02)
    # every size's accuracy too (latencies are measured, so they differ)
    a, b = (read_json(r / "summary.json")["nested"] for r in (run, reference))
    assert [x["test/top1"] for x in a] == [x["test/top1"] for x in b]


@pytest.mark.parametrize(
    "args, message",
    [
        (["nested=sorted", "nested.widths=[0,1.5]"], "nested.widths=[0, 1.5]: a list of widths, each in (0, 1]"),
        (["nested=sorted", "model=resnet20", "nested.depths=[a]"], "nested.depths=['a']: a list of depths"),
        (["nested=sorted", "nested.mode=sampel"], "nested.mode=sampel: expected one of sum, sample"),
        (["nested=matryoshka", "nested.dims=[2.5]"], "nested.dims=[2.5]: a list of whole numbers"),
        (["nested=sorted", "trainer.compile=true"], "trainer.compile=true: nested=sorted masks widths with hooks"),
        (["nested=sorted", "kd=kd", "+kd.terms.kd.student_layer=null"], "in-place distillation takes logit methods"),
        (["nested=sorted", "model=mlp"], "nested=sorted slices channels at BatchNorm layers; model mlp has none"),
        (["nested=matryoshka", "nested.dims=[8,1000]"], "each must be in 1..128 (the embedding size)"),
        (["nested=sorted", "nested.depths=[0.5]"], "model cnn_small has no residual stages to shorten"),
        (["nested=sorted", "model=resnet20", "nested.depths=[0.9]"], "two depths keep the same number of blocks"),
        (
            ["nested=sorted", "model=resnet20", "nested.depths=[0]"],
            "nested.depths=[0]: a list of depths, each in (0, 1]",
        ),
        (["kd=kd"], "kd: modrun train distils in place only between the sizes of nested=sorted"),
        (["nested=sorted", "kd=fitnet"], "kd.terms.fitnet (fitnet): in-place distillation takes logit methods"),
        (["nested=sorted", "nested.widths=[1.0]", "kd=kd"], "has no smaller size to teach"),
        (["nested=sorted", "kd=kd", "nested.widths=[abc]"], "nested.widths=['abc']: a list of widths"),
        (["nested=sorted", "model=resnet20", "nested.depths=[]"], "nested.depths=[]: a list of depths"),
        (["nested=sorted", "kd=kd", "kd.temperature=0"], "kd.terms.kd.temperature=0: must be > 0"),
    ],
)
def test_bad_nested_configs(args, message):
    r = cli("train", "trainer.epochs=1", "trainer.progress=false", *args)
    assert r.code == 2 and message in r.text, r.text
    assert not any(Path("runs").glob("train/*"))


def test_bad_sizes_at_eval():
    assert cli("train", *FAST, "nested=sorted", "nested.widths=[0.5]", "kd=[kd,dist]").code == 0
    run = str(only_run())
    assert all(f'"{term}_w0.5"' in (Path(run) / "metrics.jsonl").read_text() for term in ("kd", "dist"))
    for args, message in [
        (["nested.width=0.3"], "nested.width=0.3: the run trained the widths [0.5, 1.0]"),
        (["+nested.width=0.3"], "nested.width=0.3: the run trained the widths [0.5, 1.0]"),
        (["nested.depth=0.5"], "nested.depth=0.5: the run trained the depths [1.0]"),
        (["nested.dim=8"], "a nested=sorted run offers sizes by nested.width / nested.depth"),
        (["nested.width=abc"], "expected a number"),
    ]:
        r = cli("eval", run, *args)
        assert r.code == 2 and message in r.text, r.text
    assert cli("train", *FAST).code == 0
    plain = sorted((Path("runs") / "train").iterdir())[-1]
    r = cli("eval", str(plain), "nested.width=0.5")
    assert r.code == 2 and "not trained with nested" in r.text
