"""Nested training (`nested=sorted`, `nested=matryoshka`) through the real CLI: every size reported, one
size cut out as a physically smaller model, exact resume, bad input."""

import json
import signal
from pathlib import Path

import pytest
import torch
from conftest import FAST, cli, cli_subprocess, only_run, read_json
from safetensors.torch import load_file
from test_resume import ARGS, PLUGIN, _assert_identical, _env, _start, _wait_for_step

from modrun.models.cnn import cnn_small
from modrun.models.resnet import resnet20
from modrun.nested import extract, slim


@pytest.mark.parametrize("build", [lambda: cnn_small(1, 10, width=16), lambda: resnet20(3, 10, width=0.5)])
def test_a_masked_width_computes_what_its_cut_out_copy_computes(build):
    torch.manual_seed(0)
    model = build()
    x = torch.randn(4, next(model.parameters()).shape[1], 8, 8)
    model.train()
    for _ in range(3):  # BatchNorm statistics that are not the initial ones
        model(x)
    model.eval()
    for width in (0.25, 0.5, 1.0):
        small, _ = extract(model, width, x.shape[1])
        with torch.no_grad(), slim(model, width):
            torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in extract(model, 0.5, x.shape[1])[0].parameters()) < sum(
        p.numel() for p in model.parameters()
    )


def test_sorted_run_reports_every_width_and_cuts_one_out():
    r = cli("train", *FAST, "trainer.epochs=2", "nested=sorted", "nested.kd_weight=1.0")
    assert r.code == 0, r.text
    run = only_run()
    rows = read_json(run / "summary.json")["nested"]
    assert [row["width"] for row in rows] == [0.25, 0.5, 0.75, 1.0]
    params = [row["params"] for row in rows]
    assert params == sorted(params) and len(set(params)) == 4
    # width 0.5 of a 16-wide cnn_small is exactly an 8-wide one
    assert rows[1]["params"] == sum(p.numel() for p in cnn_small(1, 10, width=8).parameters())
    assert json.loads((run / "nested.json").read_text()) == rows and (run / "nested.png").stat().st_size > 1000
    assert all(0 <= row["test/top1"] <= 100 for row in rows) and rows[-1]["test/top1"] > 80
    assert "ce_w0.25" in (run / "metrics.jsonl").read_text()

    r = cli("eval", str(run), "nested.width=0.5")
    assert r.code == 0, r.text
    evaluated = json.loads((run / "evals.jsonl").read_text().splitlines()[-1])
    assert evaluated["nested"] == 0.5 and evaluated["test/top1"] == pytest.approx(rows[1]["test/top1"])
    # the saved sub-network is a standalone model: an 8-wide cnn_small loads it as it is
    saved = run / "nested" / "width_0.5"
    assert (saved / "model_shapes.json").is_file()
    small = cnn_small(1, 10, width=8)
    small.load_state_dict(load_file(saved / "model.safetensors"))


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


def test_sampled_widths_resume_bitwise(tmp_path):
    (tmp_path / "slowplugin.py").write_text(PLUGIN)
    args = [*ARGS, "trainer.epochs=2", "nested=sorted", "nested.mode=sample", "nested.widths=[0.25,0.5,0.75]"]
    ref = cli_subprocess("train", "--runs-dir", "ref", *args, cwd=tmp_path, env=_env(tmp_path, 0))
    assert ref.returncode == 0, ref.stderr
    proc = _start(tmp_path, "killed", 0.02, "train", "--runs-dir", "killed", *args)
    run = _wait_for_step(tmp_path / "killed", 25, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = cli_subprocess("resume", str(run), cwd=tmp_path, env=_env(tmp_path, 0))
    assert done.returncode == 0, done.stderr
    _assert_identical(only_run(runs_dir=tmp_path / "ref"), run)
    # every size's accuracy too (latencies are measured, so they differ)
    a, b = (read_json(r / "summary.json")["nested"] for r in (run, only_run(runs_dir=tmp_path / "ref")))
    assert [x["test/top1"] for x in a] == [x["test/top1"] for x in b]


@pytest.mark.parametrize(
    "args, message",
    [
        (["nested=sorted", "nested.widths=[0,1.5]"], "nested.widths=[0, 1.5]: each width must be in (0, 1]"),
        (["nested=sorted", "model=mlp"], "nested=sorted slices channels at BatchNorm layers; model mlp has none"),
        (["nested=matryoshka", "nested.dims=[8,1000]"], "each must be in 1..128 (the embedding size)"),
    ],
)
def test_bad_nested_configs(args, message):
    r = cli("train", "trainer.epochs=1", "trainer.progress=false", *args)
    assert r.code == 2 and message in r.text, r.text
    assert not any(Path("runs").glob("train/*"))


def test_bad_sizes_at_eval():
    assert cli("train", *FAST, "nested=sorted", "nested.widths=[0.5]").code == 0
    run = str(only_run())
    for args, message in [
        (["nested.width=0.3"], "nested.width=0.3: the run trained the sizes [0.5, 1.0]"),
        (["nested.dim=8"], "a nested=sorted run offers sizes by nested.width"),
        (["nested.width=abc"], "expected a number"),
    ]:
        r = cli("eval", run, *args)
        assert r.code == 2 and message in r.text, r.text
    assert cli("train", *FAST).code == 0
    plain = sorted((Path("runs") / "train").iterdir())[-1]
    r = cli("eval", str(plain), "nested.width=0.5")
    assert r.code == 2 and "not trained with nested" in r.text
