"""Sorted exits (`nested=exits`, Sorted LLaMA): the loss against the paper's sum written out by hand, an exit cut
out equal to the exit, the CLI on gpt and vit (rows per exit, `eval nested.exit=n`), exact resume, bad input."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import cli, cli_subprocess, only_run, read_json
from omegaconf import OmegaConf
from test_lm import SLOW_GPT, TINY
from test_resume import _assert_identical, _env, _start, _wait_for_step

from modrun.components.models.gpt import GPT
from modrun.methods.distill.methods_logit import HintonKD
from modrun.methods.nested import subnet
from modrun.methods.nested.exits import ExitsObjective, cut_exit

GPT3 = [*TINY, "model.n_layer=3", "trainer.epochs=1"]


def _hand_exits(model: GPT, idx: torch.Tensor) -> dict[int, torch.Tensor]:
    """Logits of every exit, written out: embeddings, the first n blocks, the final LayerNorm, the tied head."""
    x = model.tok_emb(idx) + model.pos_emb(torch.arange(idx.shape[1]))
    out = {}
    for n, block in enumerate(model.blocks, start=1):
        x = block(x)
        out[n] = F.linear(F.layer_norm(x, (x.shape[-1],), model.ln_f.weight, model.ln_f.bias), model.tok_emb.weight)
    return out


def _kl_per_token(s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD over tokens: sum_v p_t (log p_t - log p_s) at temperature T, mean over tokens, times T^2."""
    s, t = s.reshape(-1, s.shape[-1]) / temperature, t.reshape(-1, t.shape[-1]) / temperature
    pt = t.softmax(-1)
    return (pt * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1).mean() * temperature**2


@pytest.mark.parametrize("kd", [False, True])
def test_the_loss_is_the_mean_over_exits_of_the_papers_terms(kd):
    torch.manual_seed(0)
    model = GPT(256, 64, n_layer=4, n_head=2, n_embd=32).eval()
    idx, y = torch.randint(0, 256, (32, 64)), torch.randint(0, 256, (32, 64))  # 2,048 tokens
    node = OmegaConf.create({"name": "exits", "exits": [1, 3], "mode": "sum"})
    terms = {"kd": (0.5, 0.0, HintonKD(None, temperature=2.0))} if kd else {}
    loss, logits, logged = ExitsObjective(model, node, 0, terms).loss(idx, y, torch.arange(32))
    hand = _hand_exits(model, idx)
    want = 0.0
    for n in (4, 3, 1):  # the full depth always trains; it teaches the shallower exits
        ce = F.cross_entropy(hand[n].reshape(-1, 256), y.reshape(-1))
        torch.testing.assert_close(logged[f"ce_e{n}"], ce, rtol=1e-5, atol=1e-5)
        want = want + ce + (0.5 * _kl_per_token(hand[n], hand[4], 2.0) if kd and n < 4 else 0.0)
    torch.testing.assert_close(loss, want / 3, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, hand[4], rtol=1e-5, atol=1e-5)
    assert ("kd_e1" in logged) == kd and "kd_e4" not in logged


def test_sampled_exits_are_the_full_model_and_one_drawn_by_the_step():
    model = GPT(256, 16, n_layer=4, n_head=2, n_embd=16)
    node = OmegaConf.create({"name": "exits", "exits": None, "mode": "sample"})
    objective = ExitsObjective(model, node, seed=3)
    idx = torch.randint(0, 256, (2, 16))
    drawn = []
    for step in range(12):
        objective.after_step(step)
        logged = objective.loss(idx, idx, torch.arange(2))[2]
        assert "ce_e4" in logged and len(logged) == 2
        drawn.append(sorted(logged))
    objective.after_step(5)
    assert sorted(objective.loss(idx, idx, torch.arange(2))[2]) == drawn[5]  # a function of the step: resumable
    assert len({tuple(d) for d in drawn}) > 1


def test_an_exit_cut_out_computes_the_exit_and_loads_from_its_folder(tmp_path):
    torch.manual_seed(1)
    model = GPT(256, 32, n_layer=3, n_head=2, n_embd=32).eval()
    idx = torch.randint(0, 256, (4, 32))
    hand = _hand_exits(model, idx)
    with torch.no_grad():
        for n in (1, 2, 3):
            small = cut_exit(model, n)
            assert len(small.blocks) == n and small.feature_layers == tuple(f"blocks.{i}" for i in range(n))
            torch.testing.assert_close(small(idx), hand[n], rtol=1e-5, atol=1e-5)
    assert len(model.blocks) == 3  # the original is left whole


def test_gpt_exits_through_the_cli_report_every_exit_and_eval_cuts_one_out():
    r = cli("train", *GPT3, "nested=sorted", "nested.exits=[1,2]", "kd=kd")  # Sorted LLaMA's spelling of nested=exits
    assert r.code == 0, r.text
    run = only_run()
    assert OmegaConf.load(run / "config.yaml").nested.name == "exits"  # the record names the method it ran
    rows = read_json(run / "nested.json")
    assert [row["exit"] for row in rows] == [1, 2, 3]
    assert rows[0]["params"] < rows[1]["params"] < rows[2]["params"] and rows[0]["macs"] < rows[2]["macs"]
    assert all("test/bpb" in row and "test/top1" in row for row in rows)
    assert read_json(run / "summary.json")["nested"] == rows
    assert "kd_e1" in (run / "metrics.jsonl").read_text()
    e = cli("eval", str(run), "nested.exit=1")
    assert e.code == 0, e.text
    saved = subnet.load(run / "nested" / "e1")
    assert len(saved.blocks) == 1 and OmegaConf.load(run / "nested" / "e1" / "model.yaml").n_layer == 1
    record = json.loads((run / "evals.jsonl").read_text().splitlines()[-1])
    assert record["nested"] == {"exit": 1}
    assert record["test/loss"] == pytest.approx(rows[0]["test/loss"], rel=1e-6)  # the row measured the cut model


def test_vit_exits_on_digits_through_the_cli():
    args = ["model=vit", "model.depth=2", "model.dim=16", "model.heads=2", "trainer.epochs=1", "trainer.progress=false"]
    r = cli("train", *args, "nested=exits")
    assert r.code == 0, r.text
    rows = read_json(only_run() / "nested.json")
    assert [row["exit"] for row in rows] == [1, 2] and all("test/top1" in row for row in rows)


def test_killed_exits_run_resumes_bitwise(tmp_path):
    (tmp_path / "slowlm.py").write_text(SLOW_GPT)
    env = _env(tmp_path, 0)
    args = [*TINY, "+imports=[slowlm]", "model.name=slow_gpt", "model.n_layer=3", "model.dropout=0.1"]
    args += ["nested=exits", "nested.mode=sample", "kd=kd", "trainer.epochs=2"]
    args += ["trainer.checkpoint_every_steps=3", "trainer.log_every_steps=1"]
    ref = cli_subprocess("train", "--runs-dir", "ref", *args, cwd=tmp_path, env=env)
    assert ref.returncode == 0, ref.stderr
    proc = _start(tmp_path, "killed", 0.05, "train", "--runs-dir", "killed", *args)
    run = _wait_for_step(tmp_path / "killed", 5, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = cli_subprocess("resume", str(run), "+imports=[slowlm]", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    ref_run = only_run(runs_dir=tmp_path / "ref")
    _assert_identical(ref_run, run)
    measured = [
        [{k: v for k, v in row.items() if "latency" not in k} for row in read_json(r / "nested.json")]
        for r in (ref_run, run)
    ]
    assert measured[0] == measured[1] and len(measured[0]) == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["nested.exits=[2,1]"], "nested.exits=[2, 1]: block counts must increase, e.g. [1, 2]"),
        (["nested.exits=[1,5]"], "nested.exits=[1, 5]: model gpt has 3 blocks; exits 1..3"),
        (["nested.exits=[0]"], "nested.exits=[0]: null (every depth) or a list of block counts >= 1"),
        (["nested.exits=[3]", "kd=kd"], "kd: nested.exits=[3] is only the full depth; there is no exit to teach"),
        (["nested.mode=all"], "nested.mode=all: expected one of sum, sample"),
        (["trainer.compile=true"], "trainer.compile=true: nested=exits reads the exits' hidden states with hooks"),
        (["model=cnn_small"], "nested=exits: model cnn_small has no `blocks` list"),
    ],
)
def test_exits_bad_input_is_one_line_and_no_run_folder(args, message):
    base = ["trainer.epochs=1"] if args == ["model=cnn_small"] else GPT3  # a CNN on the default digits
    r = cli("train", *base, "nested=exits", *args)
    assert r.code == 2 and message in r.err and "Traceback" not in r.text, r.text
    assert not Path("runs").exists()


def test_sorted_exits_with_widths_is_one_line():
    r = cli("train", *GPT3, "nested=sorted", "nested.exits=[1,2]", "nested.widths=[0.5,1.0]")
    assert r.code == 2 and "nested.exits with nested.widths: exits train depths of whole blocks" in r.err, r.text


def test_eval_refuses_an_exit_the_run_did_not_train():
    assert cli("train", *GPT3, "nested=exits", "nested.exits=[2]").code == 0
    r = cli("eval", str(only_run()), "nested.exit=1")
    assert r.code == 2 and "nested.exit=1: the run trained the exits [2, 3]" in r.err, r.text
    r = cli("eval", str(only_run()), "nested.width=0.5")
    assert r.code == 2 and "a nested=exits run offers sizes by nested.exit" in r.err, r.text
