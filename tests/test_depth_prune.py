"""prune=layers (depth pruning) and `eval skip=[...]`: the scores written here from the papers' formulas, the
removed model equal to a hand-written forward without those units, and the CLI on gpt, vit and a HF Llama."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import FAST, cli, only_run, read_json
from test_lm import TINY

from modrun.components.models.gpt import GPT
from modrun.methods.prune.context import PruneContext
from modrun.methods.prune.depth import layers

DEEP = [*TINY, "model.n_layer=4", "trainer.epochs=1"]


def _setup(seed: int = 0) -> tuple[GPT, list[torch.Tensor]]:
    torch.manual_seed(seed)
    model = GPT(256, 32, n_layer=6, n_head=2, n_embd=64).eval()
    return model, [torch.randint(0, 256, (32, 32)) for _ in range(3)]


def _ctx(model: torch.nn.Module, calib: list[torch.Tensor]) -> PruneContext:
    def loss(n: int) -> float:
        with torch.no_grad():
            return float(
                np.mean([torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()) for x in calib])
            )

    return PruneContext(model, {}, 0, calib[0][:1], 256, Path("."), lambda n: lambda: iter(calib), loss)


def _streams(model: GPT, x: torch.Tensor) -> list[np.ndarray]:
    """The residual stream entering block 0 and leaving every block, by hand."""
    h = model.tok_emb(x) + model.pos_emb(torch.arange(x.shape[1]))
    out = [h.detach().double().numpy()]
    for block in model.blocks:
        h = block(h)
        out.append(h.detach().double().numpy())
    return out


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_angular_removes_the_consecutive_blocks_gromov_picks():
    model, calib = _setup()
    with torch.no_grad():
        streams = [_streams(model, x) for x in calib]
    n = 3  # ratio 0.5 of 6 blocks
    dist = [np.mean(np.concatenate([np.arccos(np.clip(_cos(s[l][:, -1], s[l + n][:, -1]), -1, 1)) / math.pi
                                    for s in streams])) for l in range(6 - n + 1)]  # noqa: E741  # fmt: skip
    pruner = layers(_ctx(model, calib), ratio=0.5, score="angular")
    pruner.start(0)
    np.testing.assert_allclose(pruner.scores, dist, rtol=1e-5)
    best = int(np.argmin(dist))
    assert pruner.removed == list(range(best, best + n))


def test_cosine_is_block_influence_over_every_position_and_the_result_is_shallower():
    model, calib = _setup(1)
    dense = GPT(256, 32, n_layer=6, n_head=2, n_embd=64).eval()
    dense.load_state_dict(model.state_dict())
    with torch.no_grad():
        streams = [_streams(model, x) for x in calib]
    bi = [1 - np.mean(np.concatenate([_cos(s[i], s[i + 1]).ravel() for s in streams])) for i in range(6)]
    pruner = layers(_ctx(model, calib), ratio=0.34, score="cosine")  # round(0.34 x 6) = 2
    pruner.start(0)
    np.testing.assert_allclose(pruner.scores, bi, rtol=1e-5)
    assert pruner.removed == sorted(np.argsort(bi)[:2].tolist())
    x = calib[0]
    with torch.no_grad():  # the pruned model is the dense one without those blocks
        h = dense.tok_emb(x) + dense.pos_emb(torch.arange(32))
        for i, block in enumerate(dense.blocks):
            h = h if i in pruner.removed else block(h)
        torch.testing.assert_close(model(x), dense.head(dense.ln_f(h)))
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in dense.parameters())


@pytest.mark.parametrize("part", ["attention", "mlp"])
def test_sublayers_are_scored_and_removed_alone(part):
    model, calib = _setup(2)
    dense = GPT(256, 32, n_layer=6, n_head=2, n_embd=64).eval()
    dense.load_state_dict(model.state_dict())

    def forward(x: torch.Tensor, drop: set[int]) -> tuple[torch.Tensor, list[float]]:
        h, losses = dense.tok_emb(x) + dense.pos_emb(torch.arange(32)), []
        for i, b in enumerate(dense.blocks):
            branch = (lambda z, b=b: b.attn(b.ln1(z))) if part == "attention" else (lambda z, b=b: b.mlp(b.ln2(z)))
            other = (lambda z, b=b: b.mlp(b.ln2(z))) if part == "attention" else (lambda z, b=b: b.attn(b.ln1(z)))
            if part == "mlp":
                h = h + other(h)
            after = h + branch(h)
            cos = _cos(h[:, -1].double().numpy(), after[:, -1].double().numpy())
            losses.append(float(np.mean(np.arccos(np.clip(cos, -1, 1)) / math.pi)))
            h = h if i in drop else after
            if part == "attention":
                h = h + other(h)
        return dense.head(dense.ln_f(h)), losses

    with torch.no_grad():
        per_batch = [forward(x, set())[1] for x in calib]
    # equal batch sizes: the mean over windows is the mean of the per-batch means
    angular = np.mean(per_batch, axis=0)
    pruner = layers(_ctx(model, calib), ratio=0.5, score="angular", part=part)
    pruner.start(0)
    np.testing.assert_allclose(pruner.scores, angular, rtol=1e-5)
    assert pruner.removed == sorted(np.argsort(angular)[:3].tolist())
    with torch.no_grad():
        torch.testing.assert_close(model(calib[0]), forward(calib[0], set(pruner.removed))[0])


def test_loss_score_is_the_measured_increase_with_each_block_skipped():
    model, calib = _setup(3)
    dense = GPT(256, 32, n_layer=6, n_head=2, n_embd=64).eval()
    dense.load_state_dict(model.state_dict())

    def loss(skip: int | None) -> float:
        total = []
        with torch.no_grad():
            for x in calib:
                h = dense.tok_emb(x) + dense.pos_emb(torch.arange(32))
                for i, b in enumerate(dense.blocks):
                    h = h if i == skip else b(h)
                total.append(
                    float(torch.nn.functional.cross_entropy(dense.head(dense.ln_f(h)).flatten(0, 1), x.flatten()))
                )
        return float(np.mean(total))

    expected = [loss(i) - loss(None) for i in range(6)]
    pruner = layers(_ctx(model, calib), ratio=0.5, score="loss")
    pruner.start(0)
    np.testing.assert_allclose(pruner.scores, expected, rtol=1e-4, atol=1e-6)
    assert pruner.removed == sorted(np.argsort(expected)[:3].tolist())


def _source() -> Path:
    r = cli("train", *DEEP, "runs_dir=src")
    assert r.code == 0, r.text
    return only_run(runs_dir=Path("src"))


def test_depth_pruning_through_the_cli_recovers_and_eval_rebuilds_it():
    source = _source()
    r = cli("prune", f"source.run={source}", "prune=layers", "prune.score=cosine", "recover=finetune",
            "trainer.epochs=1", "trainer.progress=false")  # fmt: skip
    assert r.code == 0, r.text
    run = only_run("prune")
    summary = read_json(run / "summary.json")
    removed = summary["depth"]["removed"]
    assert len(removed) == 2 and len(summary["depth"]["scores"]) == 4
    shapes = read_json(run / "model_shapes.json")
    assert {f"blocks.{i}" for i in removed} == set(shapes)
    assert summary["pruned"]["macs"] < 0.7 * summary["dense"]["macs"]
    e = cli("eval", str(run))
    assert e.code == 0, e.text
    assert f"{summary['final']['test/bpb']:.4f}" in e.text  # the shallower model rebuilt from its record


def test_eval_skip_equals_the_model_with_those_blocks_removed():
    source = _source()
    r = cli("prune", f"source.run={source}", "prune=layers", "prune.part=attention", "recover=none")
    assert r.code == 0, r.text
    removed = read_json(only_run("prune") / "summary.json")["depth"]["removed"]
    assert read_json(only_run("prune") / "model_shapes.json")[f"blocks.{removed[0]}.attn"]["type"] == "ZeroBranch"
    r = cli("prune", f"source.run={source}", "prune=layers", "prune.score=loss", "recover=none", "runs_dir=blocks")
    assert r.code == 0, r.text
    pruned = read_json(only_run("prune", Path("blocks")) / "summary.json")
    e = cli("eval", str(source), f"skip=[{','.join(map(str, pruned['depth']['removed']))}]")
    assert e.code == 0, e.text
    assert f"{pruned['final']['test/bpb']:.4f}" in e.text
    last = yaml.safe_load((source / "evals.jsonl").read_text().splitlines()[-1])
    assert last["skip"] == pruned["depth"]["removed"]


def test_depth_pruning_a_vit():
    r = cli("train", "model=vit", "data=digits", *FAST[:1], "model.depth=4", "model.dim=32", "model.heads=2",
            "data.batch_size=64", "trainer.progress=false", "runs_dir=src")  # fmt: skip
    assert r.code == 0, r.text
    r = cli("prune", f"source.run={only_run(runs_dir=Path('src'))}", "prune=layers", "prune.part=mlp", "recover=none")
    assert r.code == 0, r.text
    assert len(read_json(only_run("prune") / "summary.json")["depth"]["removed"]) == 2


def test_depth_pruning_a_hugging_face_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}
    cfg = transformers.LlamaConfig(vocab_size=256, num_hidden_layers=4, max_position_embeddings=64, **sizes)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    text = ["data=python_docs", "data.block_size=32", "data.windows_per_epoch=64", "data.batch_size=16"]
    r = cli("train", "model=hf", f"model.path={tmp_path / 'llama'}", *text, "trainer.epochs=0", "runs_dir=src")
    assert r.code == 0, r.text
    source = only_run(runs_dir=Path("src"))
    for part in ("block", "attention"):
        r = cli("prune", f"source.run={source}", "prune=layers", f"prune.part={part}", "recover=finetune",
                "trainer.epochs=1", "trainer.progress=false", f"runs_dir={part}")  # fmt: skip
        assert r.code == 0, r.text
        run = only_run("prune", Path(part))
        assert cli("eval", str(run)).code == 0
    shapes = read_json(run / "model_shapes.json")
    assert any(s == {"type": "ZeroBranch", "pair": True} for s in shapes.values())  # HF attention: (out, weights)


@pytest.mark.parametrize(
    "args, message",
    [
        (["prune.ratio=0.9"], "would remove every block (4)"),
        (["prune.ratio=0.1"], "removes no block of 4"),
        (["prune.score=angle"], "prune.score=angle: expected one of angular, cosine, loss"),
        (["prune.part=heads"], "prune.part=heads: expected one of block, attention, mlp"),
        (["prune.calib_batches=0"], "prune.calib_batches=0"),
    ],
)
def test_depth_bad_input_is_one_line(args, message):
    r = cli("validate", "prune", *DEEP, "prune=layers", *args)
    assert r.code == 2 and message in r.text and "Traceback" not in r.text, r.text


def test_depth_on_a_cnn_and_bad_skip_are_one_line():
    r = cli("validate", "prune", "prune=layers")
    assert r.code == 2 and "are not a list of transformer blocks" in r.text, r.text
    source = _source()
    for skip, message in (("[4]", "block 4 does not exist; this model has blocks 0..3"),
                          ("[0,1,2,3]", "would skip every block"), ("two", "expected block indices")):  # fmt: skip
        r = cli("eval", str(source), f"skip={skip}")
        assert r.code == 2 and message in r.text, r.text


def test_sensitivity_per_layer_skips_each_unit_alone_and_ranks_them():
    """prune=sensitivity prune.unit=layer: every block, attention and MLP skipped alone; the block rows equal
    `eval skip=[i]` (an independent path), the ranking is the rows sorted by val loss (minimised)."""
    source = _source()
    r = cli("prune", f"source.run={source}", "prune=sensitivity", "prune.unit=layer")
    assert r.code == 0, r.text
    run = only_run("prune")
    rows = (run / "sensitivity.csv").read_text().splitlines()
    assert rows[0] == "block,layer,part,val_loss,params" and len(rows) == 1 + 4 * 3
    assert (run / "sensitivity.png").stat().st_size > 1000
    summary = read_json(run / "summary.json")
    table = summary["sensitivity"]
    for part in ("block", "attention", "mlp"):
        mine = sorted((r for r in table if r["part"] == part), key=lambda r: r["val_loss"])
        assert summary["least_damaging"][part] == [r["block"] for r in mine]
    blocks = {r["block"]: r["val_loss"] for r in table if r["part"] == "block"}
    attention = {r["block"]: r["params"] for r in table if r["part"] == "attention"}
    assert all(attention[r["block"]] < r["params"] for r in table if r["part"] == "block")
    for i in (0, 3):
        e = cli("eval", str(source), f"skip=[{i}]")
        assert e.code == 0, e.text
        last = yaml.safe_load((source / "evals.jsonl").read_text().splitlines()[-1])
        assert last["val/loss"] == pytest.approx(blocks[i], rel=1e-5)
    assert summary["final"]["val/loss"] < max(blocks.values())  # the dense score beside them


def test_sensitivity_per_layer_needs_blocks_and_a_known_unit():
    r = cli("validate", "prune", "prune=sensitivity", "prune.unit=layer")
    assert r.code == 2 and "are not a list of transformer blocks" in r.text, r.text
    r = cli("validate", "prune", *DEEP, "prune=sensitivity", "prune.unit=block")
    assert r.code == 2 and "prune.unit=block: valid units are weight, layer" in r.text, r.text


def test_vit_sensitivity_per_layer_and_eval_skip():
    r = cli("train", "model=vit", "data=digits", *FAST[:1], "model.depth=3", "model.dim=32", "model.heads=2",
            "data.batch_size=64", "trainer.progress=false", "runs_dir=src")  # fmt: skip
    assert r.code == 0, r.text
    source = only_run(runs_dir=Path("src"))
    r = cli("prune", f"source.run={source}", "prune=sensitivity", "prune.unit=layer")
    assert r.code == 0, r.text
    summary = read_json(only_run("prune") / "summary.json")
    assert (only_run("prune") / "sensitivity.csv").read_text().splitlines()[0] == "block,layer,part,val_top1,params"
    worst = summary["least_damaging"]["block"][-1]
    block = next(r for r in summary["sensitivity"] if r["part"] == "block" and r["block"] == worst)
    e = cli("eval", str(source), f"skip=[{worst}]")
    assert e.code == 0, e.text
    last = yaml.safe_load((source / "evals.jsonl").read_text().splitlines()[-1])
    assert last["val/top1"] == pytest.approx(block["val_top1"], abs=1e-6)
