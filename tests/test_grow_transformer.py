"""G_stack on transformers: `grow=stack grow.factor=g` makes block k of the grown gpt / vit a copy of source block
k mod n (embeddings, final norm and head copied), through the CLI; the grown model computes the source's blocks
run g times over, written out by hand here."""

from pathlib import Path

import pytest
import torch
from conftest import FAST, cli, only_run, read_json
from omegaconf import OmegaConf
from test_lm import TINY

from modrun.components.models.gpt import GPT
from modrun.methods.grow.stack import stack


@pytest.mark.parametrize("order, plan", [("repeat", [0, 1, 2, 0, 1, 2]), ("interleave", [0, 0, 1, 1, 2, 2])])
def test_the_grown_gpt_runs_the_source_blocks_in_the_planned_order(order, plan):
    torch.manual_seed(0)
    source, grown = GPT(256, 32, n_layer=3, n_head=2, n_embd=32).eval(), GPT(256, 32, n_layer=6, n_head=2, n_embd=32)
    record = stack(source, grown.eval(), OmegaConf.create({"factor": 2, "order": order}), 0)
    assert record["copies"] == {f"blocks.{k}": f"blocks.{i}" for k, i in enumerate(plan)}
    x = torch.randint(0, 256, (16, 32))
    with torch.no_grad():
        h = source.tok_emb(x) + source.pos_emb(torch.arange(32))
        for i in plan:
            h = source.blocks[i](h)
        torch.testing.assert_close(grown(x), source.head(source.ln_f(h)))
    assert grown.head.weight is grown.tok_emb.weight  # the grown model's head is still tied


def test_stacking_a_gpt_through_the_cli_records_source_grown_and_trained():
    r = cli("train", *TINY, "model.n_layer=2", "trainer.epochs=1", "runs_dir=src")
    assert r.code == 0, r.text
    source = only_run(runs_dir=Path("src"))
    r = cli("grow", f"source.run={source}", "grow=stack", "grow.factor=2", "trainer.epochs=1", "trainer.progress=false")
    assert r.code == 0, r.text
    run = only_run("grow")
    s = read_json(run / "summary.json")
    assert s["grow"]["grown_model"]["name"] == "gpt" and s["grow"]["grown_model"]["n_layer"] == 4
    assert OmegaConf.load(run / "config.yaml").model.n_layer == 4
    before, src = s["grown_before_training"], s["source"]
    assert {"val/loss", "val/bpb", "test/bpb", "params"} <= before.keys() and before["params"] > src["params"]
    assert s["final"]["val/loss"] < before["val/loss"]  # trained after growing
    e = cli("eval", str(run))
    assert e.code == 0 and f"{s['final']['test/bpb']:.4f}" in e.text, e.text


def test_stacking_a_vit():
    r = cli("train", "model=vit", "data=digits", *FAST[:1], "model.depth=2", "model.dim=32", "model.heads=4",
            "data.batch_size=64", "trainer.progress=false", "runs_dir=src")  # fmt: skip
    assert r.code == 0, r.text
    r = cli("grow", f"source.run={only_run(runs_dir=Path('src'))}", "grow=stack", "grow.factor=3", "trainer.epochs=0")
    assert r.code == 0, r.text
    s, record = read_json(only_run("grow") / "summary.json"), read_json(only_run("grow") / "grow.json")
    assert s["grow"]["grown_model"]["depth"] == 6 and record["copies"]["blocks.5"] == "blocks.1"
    assert s["grown_before_training"]["params"] > 2 * s["source"]["params"] - 20_000


@pytest.mark.parametrize("factor", ["1", "1.5"])
def test_a_factor_below_two_or_fractional_on_a_transformer_is_refused(factor):
    r = cli("grow", *TINY, "grow=stack", f"grow.factor={factor}")
    assert r.code == 2 and f"grow.factor={factor}" in r.text and "Traceback" not in r.text, r.text
    assert not Path("runs/grow").exists()
