"""prune=channel on transformers: whole attention heads and MLP neurons removed (the stream's width kept), the
pruned model equal to a hand-written forward of the dense one restricted to what was kept, and the CLI."""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, cli, only_run, read_json
from test_lm import TINY

from modrun.components.models.gpt import GPT
from modrun.methods.prune.context import PruneContext
from modrun.methods.prune.structured import channel


def _pruned(importance: str = "l2", seed: int = 0) -> tuple[GPT, GPT, torch.Tensor]:
    torch.manual_seed(seed)
    dense = GPT(256, 32, n_layer=3, n_head=4, n_embd=64).eval()
    model = copy.deepcopy(dense)
    x = torch.randint(0, 256, (16, 32))
    channel(PruneContext(model, {}, 0, x[:1], 256, Path(".")), ratio=0.5, importance=importance).start(0)
    return dense, model, x


def _kept_rows(dense: torch.Tensor, pruned: torch.Tensor) -> list[int]:
    """Which rows of the dense matrix the pruned one kept (rows are distinct random vectors)."""
    return [int((dense - row).abs().sum(1).argmin()) for row in pruned]


def test_heads_and_neurons_go_whole_and_the_model_is_the_dense_one_restricted():
    dense, model, x = _pruned()
    hd = 16
    h = dense.tok_emb(x) + dense.pos_emb(torch.arange(32))
    for b_dense, b in zip(dense.blocks, model.blocks, strict=True):
        assert b.attn.heads == 2 and b.attn.qkv.out_features == 3 * 2 * hd and b.mlp.fc.out_features == 128
        q_rows = _kept_rows(b_dense.attn.qkv.weight[:64], b.attn.qkv.weight[: 2 * hd])
        heads = sorted({r // hd for r in q_rows})
        assert len(heads) == 2 and q_rows == [hh * hd + i for hh in heads for i in range(hd)]  # whole heads
        neurons = _kept_rows(b_dense.mlp.fc.weight, b.mlp.fc.weight)
        # the reference: the dense block with only those heads and neurons, written out
        a = b_dense.ln1(h)
        q, k, v = (a @ b_dense.attn.qkv.weight.T + b_dense.attn.qkv.bias).split(64, dim=-1)
        outs = []
        for hh in heads:
            s = slice(hh * hd, (hh + 1) * hd)
            outs.append(F.scaled_dot_product_attention(q[..., s], k[..., s], v[..., s], is_causal=True))
        cols = [hh * hd + i for hh in heads for i in range(hd)]
        h = h + torch.cat(outs, -1) @ b_dense.attn.proj.weight[:, cols].T + b_dense.attn.proj.bias
        m = F.gelu(b_dense.ln2(h) @ b_dense.mlp.fc.weight[neurons].T + b_dense.mlp.fc.bias[neurons])
        h = h + m @ b_dense.mlp.proj.weight[:, neurons].T + b_dense.mlp.proj.bias
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense.head(dense.ln_f(h)), atol=1e-5, rtol=1e-4)
    assert model.tok_emb.weight.shape == (256, 64) and model.head.weight is model.tok_emb.weight  # still tied


def test_l2_keeps_the_neurons_and_heads_of_largest_norm():
    dense, model, _ = _pruned("l2", seed=1)
    for b_dense, b in zip(dense.blocks, model.blocks, strict=True):
        norms = b_dense.mlp.fc.weight.norm(dim=1)
        assert sorted(_kept_rows(b_dense.mlp.fc.weight, b.mlp.fc.weight)) == sorted(norms.topk(128).indices.tolist())


def _gpt_source() -> Path:
    r = cli("train", *TINY, "model.n_layer=2", "model.n_head=4", "model.n_embd=64", "trainer.epochs=1",
            "runs_dir=src")  # fmt: skip
    assert r.code == 0, r.text
    return only_run(runs_dir=Path("src"))


def test_width_pruning_a_gpt_through_the_cli_with_kd_recovery():
    source = _gpt_source()
    r = cli("prune", f"source.run={source}", "prune=channel", "recover=distill", "trainer.epochs=1",
            "trainer.progress=false")  # fmt: skip
    assert r.code == 0, r.text
    run = only_run("prune")
    shapes = read_json(run / "model_shapes.json")
    assert shapes["blocks.0.attn"] == {"type": "Attention", "heads": 2}
    assert shapes["blocks.1.mlp.fc"]["out_features"] == 128
    summary = read_json(run / "summary.json")
    assert summary["pruned"]["params"] < 0.6 * summary["dense"]["params"]
    e = cli("eval", str(run))
    assert e.code == 0 and f"{summary['final']['test/bpb']:.4f}" in e.text, e.text
    # the pruned run teaches, and is pruned again, rebuilt from its record each time
    assert cli("validate", "distill", *TINY, f"teacher.run={run}").code == 0
    r = cli("prune", f"source.run={run}", "prune=layers", "recover=none", "runs_dir=again")
    assert r.code == 0, r.text


def test_width_pruning_a_vit():
    r = cli("train", "model=vit", "data=digits", *FAST[:1], "model.depth=2", "model.dim=32", "model.heads=4",
            "data.batch_size=64", "trainer.progress=false", "runs_dir=src")  # fmt: skip
    assert r.code == 0, r.text
    r = cli("prune", f"source.run={only_run(runs_dir=Path('src'))}", "prune=channel", "recover=none")
    assert r.code == 0, r.text
    shapes = read_json(only_run("prune") / "model_shapes.json")
    assert shapes["blocks.0.attn"]["heads"] == 2 and "patch" not in " ".join(shapes)  # the stream keeps its width


@pytest.mark.parametrize("ratio", ["1.0", "0"])
def test_a_ratio_removing_every_head_or_none_is_refused(ratio):
    r = cli("validate", "prune", *TINY, "prune=channel", f"prune.ratio={ratio}")
    assert r.code == 2 and f"prune.ratio={ratio}: must be in (0, 1)" in r.text, r.text


LLAMA = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}


def _llama(tmp_path: Path | None = None, layers: int = 2):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, num_hidden_layers=layers, max_position_embeddings=64, **LLAMA)
    model = transformers.LlamaForCausalLM(cfg).eval()
    if tmp_path is not None:
        model.save_pretrained(tmp_path / "llama")
    return model


def test_llama_key_value_groups_and_neurons_go_whole_and_the_rest_computes_as_before():
    from modrun.components.models.hf import HFCausalLM

    dense = HFCausalLM(_llama())
    model = copy.deepcopy(dense)
    channel(PruneContext(model, {}, 0, None, 256, Path(".")), ratio=0.5, importance="l2").start(0)
    reference = copy.deepcopy(dense)  # removed units silenced in the dense model: their only way out is zeroed
    d, g = 8, 2
    for layer, ref in zip(model.model.model.layers, reference.model.model.layers, strict=True):
        a, dense_a = layer.self_attn, ref.self_attn
        assert (a.q_proj.out_features, a.k_proj.out_features, a.num_key_value_groups) == (g * d, d, g)
        w = [dense_a.q_proj.weight.reshape(2, -1), dense_a.k_proj.weight.reshape(2, -1),
             dense_a.v_proj.weight.reshape(2, -1), dense_a.o_proj.weight.T.reshape(2, -1)]  # fmt: skip
        scores = torch.cat(w, 1).norm(dim=1)  # the l2 norm of everything a key-value group owns
        kept = int(scores.argmax())
        torch.testing.assert_close(a.k_proj.weight, dense_a.k_proj.weight[kept * d : (kept + 1) * d])
        with torch.no_grad():
            dense_a.o_proj.weight[:, [c for c in range(4 * d) if c // (g * d) != kept]] = 0
            mlp = ref.mlp
            norms = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight.T], 1).norm(dim=1)
            mlp.down_proj.weight[:, norms.argsort()[:32]] = 0
        assert layer.mlp.up_proj.out_features == 32
    x = torch.randint(0, 256, (16, 48))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-4)
    assert model.model.config.num_key_value_heads == 1 and model.model.config.head_dim == 8


def test_width_pruning_a_hugging_face_llama_through_the_cli(tmp_path):
    transformers = pytest.importorskip("transformers")
    _llama(tmp_path)
    text = ["data=python_docs", "data.block_size=32", "data.windows_per_epoch=64", "data.batch_size=16"]
    r = cli("train", "model=hf", f"model.path={tmp_path / 'llama'}", *text, "trainer.epochs=0", "runs_dir=src")
    assert r.code == 0, r.text
    source = only_run(runs_dir=Path("src"))
    r = cli("prune", f"source.run={source}", "prune=channel", "recover=finetune", "trainer.epochs=1",
            "trainer.progress=false")  # fmt: skip
    assert r.code == 0, r.text
    run = only_run("prune")
    summary = read_json(run / "summary.json")
    assert summary["width"] == {"heads": [2, 2], "key_value_heads": [1, 1], "intermediate": [32, 32]}
    e = cli("eval", str(run))
    assert e.code == 0 and f"{summary['final']['test/bpb']:.4f}" in e.text, e.text
    # the folder transformers loads by itself: the rewritten config and the recovered weights
    config = read_json(run / "hf_model" / "config.json")
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"]) == (2, 1, 32)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(run / "hf_model", local_files_only=True).eval()
    from modrun.core.artifacts import load_state

    state = load_state(run / "model.safetensors")
    down = state["model.model.layers.1.mlp.down_proj.weight"]
    torch.testing.assert_close(loaded.model.layers[1].mlp.down_proj.weight, down)
    # global pruning may leave blocks of different sizes: no single config says that, the run folder does
    r = cli("prune", f"source.run={source}", "prune=channel", "prune.global_pruning=true", "recover=none",
            "runs_dir=global")  # fmt: skip
    assert r.code == 0, r.text
    run = only_run("prune", Path("global"))
    assert cli("eval", str(run)).code == 0


def test_a_ratio_that_removes_no_key_value_group_is_refused(tmp_path):
    _llama(tmp_path)
    text = ["data=python_docs", "data.block_size=32", "data.windows_per_epoch=64", "data.batch_size=16"]
    r = cli("prune", "model=hf", f"model.path={tmp_path / 'llama'}", *text, "prune=channel", "prune.ratio=0.3",
            "recover=none", "source.epochs=0")  # fmt: skip
    assert r.code == 2 and "prune.ratio=0.3: removes no key-value group of 2" in r.text, r.text


def _taylor_ctx(model: torch.nn.Module, batches: list[torch.Tensor]) -> PruneContext:
    """A context whose calibration gradient is the mean next-token loss over `batches` (as the recipe's)."""

    def backward(n: int) -> None:
        model.zero_grad(set_to_none=True)
        for x in batches[:n]:
            logits = model(x[:, :-1])
            (F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()) / n).backward()

    return PruneContext(model, {}, 0, batches[0][:1, :-1], 256, Path("."), calibration_backward=backward)


def _hand_grads(model: torch.nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each weight times its loss gradient, computed here on a copy (the formula's w x dL/dw)."""
    twin = copy.deepcopy(model)
    loss = sum(F.cross_entropy(twin(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()) for x in batches) / len(batches)
    loss.backward()
    return {n: (p * p.grad).detach() for n, p in twin.named_parameters() if p.grad is not None}


def test_taylor_keeps_the_mlp_neurons_of_largest_first_order_score():
    """Molchanov et al. 2019: a neuron's score is sum |w x dL/dw| over its fc row and its proj column."""
    torch.manual_seed(3)
    dense = GPT(256, 32, n_layer=2, n_head=4, n_embd=64).eval()
    batches = [torch.randint(0, 256, (16, 33)) for _ in range(3)]
    wg = _hand_grads(dense, batches)
    model = copy.deepcopy(dense)
    channel(_taylor_ctx(model, batches), ratio=0.5, importance="taylor", calib_batches=3).start(0)
    for i, (b_dense, b) in enumerate(zip(dense.blocks, model.blocks, strict=True)):
        score = wg[f"blocks.{i}.mlp.fc.weight"].abs().sum(1) + wg[f"blocks.{i}.mlp.proj.weight"].abs().sum(0)
        kept = sorted(_kept_rows(b_dense.mlp.fc.weight, b.mlp.fc.weight))
        assert kept == sorted(score.topk(128).indices.tolist())
        assert b.attn.heads == 2
    assert all(p.grad is None for p in model.parameters())  # the calibration's gradients are not training's


def test_taylor_on_llama_scores_groups_and_neurons_by_hand():
    from modrun.components.models.hf import HFCausalLM

    dense = HFCausalLM(_llama())
    batches = [torch.randint(0, 256, (8, 25)) for _ in range(2)]
    wg = _hand_grads(dense, batches)
    model = copy.deepcopy(dense)
    channel(_taylor_ctx(model, batches), ratio=0.5, importance="taylor", calib_batches=2).start(0)
    d = 8
    for i, (layer, ref) in enumerate(zip(model.model.model.layers, dense.model.model.layers, strict=True)):
        key = f"model.model.layers.{i}."
        a = {p: wg[f"{key}self_attn.{p}_proj.weight"] for p in "qkvo"}
        owned = [a["q"].reshape(2, -1), a["k"].reshape(2, -1), a["v"].reshape(2, -1), a["o"].T.reshape(2, -1)]
        kept = int(torch.cat(owned, 1).abs().sum(1).argmax())
        torch.testing.assert_close(
            layer.self_attn.k_proj.weight, ref.self_attn.k_proj.weight[kept * d : (kept + 1) * d]
        )
        m = {p: wg[f"{key}mlp.{p}_proj.weight"] for p in ("gate", "up", "down")}
        score = m["gate"].abs().sum(1) + m["up"].abs().sum(1) + m["down"].abs().sum(0)
        want = sorted(score.topk(32).indices.tolist())
        assert sorted(_kept_rows(ref.mlp.up_proj.weight, layer.mlp.up_proj.weight)) == want
    assert all(p.grad is None for p in model.parameters())  # the calibration's gradients are not training's


def test_taylor_through_the_cli_on_a_gpt():
    source = _gpt_source()
    r = cli("prune", f"source.run={source}", "prune=channel", "prune.importance=taylor", "prune.calib_batches=2",
            "recover=none")  # fmt: skip
    assert r.code == 0, r.text
    summary = read_json(only_run("prune") / "summary.json")
    assert summary["pruned"]["params"] < 0.7 * summary["dense"]["params"]
    r = cli("validate", "prune", f"source.run={source}", "prune=channel", "prune.importance=taylr")
    assert r.code == 2 and "prune.importance=taylr: expected one of l1, l2, group_l2, taylor, random" in r.text
