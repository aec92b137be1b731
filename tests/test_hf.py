"""`model=hf`: Hugging Face causal LMs from tiny configs saved to a tmp folder (never the hub), through the CLI."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import cli, only_run, read_json
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

TEXT = ["data=python_docs", "data.block_size=32", "data.windows_per_epoch=64", "data.batch_size=16"]
TEXT += ["trainer.epochs=1", "trainer.progress=false", "optim=adamw", "optim.lr=3e-3"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama (grouped-query attention, tied embeddings) and a tiny GPT-2, saved with save_pretrained."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    llama = transformers.LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )  # fmt: skip
    gpt2 = transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    out = {}
    for name, cfg, cls in (("llama", llama, "LlamaForCausalLM"), ("gpt2", gpt2, "GPT2LMHeadModel")):
        getattr(transformers, cls)(cfg).save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_a_saved_hf_model_trains_evaluates_and_starts_from_its_weights(folders, name):
    r = cli("train", "model=hf", f"model.path={folders[name]}", *TEXT, "trainer.epochs=0")
    assert r.code == 0, r.text
    untrained = only_run()
    saved = load_file(folders[name] / "model.safetensors")
    ours = load_file(untrained / "model.safetensors")
    key = next(k for k in saved if k.endswith("embed_tokens.weight") or k.endswith("wte.weight"))
    assert torch.equal(ours[f"model.{key}"], saved[key])  # the folder's weights, not a fresh init
    assert not any(k.endswith("lm_head.weight") for k in ours) or name == "gpt2"  # a tied matrix stored once
    e = cli("eval", str(untrained))
    assert e.code == 0 and "bpb" in e.text, e.text


def test_an_hf_config_without_weights_trains_and_its_blocks_are_named(folders):
    config = "model.config={hidden_size:32,intermediate_size:64,num_hidden_layers:2,num_attention_heads:2}"
    r = cli("train", "model=hf", "model.arch=llama", *TEXT, config)
    assert r.code == 0, r.text
    summary = read_json(only_run() / "summary.json")
    assert summary["final"]["val/bpb"] < 8.5 and summary["macs"] > 0
    from modrun.components.models.hf import hf

    model = hf(256, path=str(folders["llama"]))
    assert model.feature_layers == ("model.model.layers.0", "model.model.layers.1")
    assert model.embedding_layer == "model.model.norm"


def test_a_padded_vocabulary_gives_logits_over_the_datas_tokens(folders, tmp_path):
    """An embedding padded to 320 rows on byte data (256): logits, loss and KD are over the 256 real tokens
    (the padding rows' logits are no token's), through the CLI and against the sliced full forward."""
    cfg = transformers.LlamaConfig(
        vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "padded")
    from modrun.components.models.hf import hf

    model = hf(256, path=str(tmp_path / "padded")).eval()
    idx = torch.randint(0, 256, (2, 16))
    full = model.model(input_ids=idx).logits
    assert full.shape[-1] == 320 and torch.equal(model(idx), full[..., :256])
    r = cli("train", "model=hf", f"model.path={tmp_path / 'padded'}", *TEXT)
    assert r.code == 0, r.text
    assert read_json(only_run() / "summary.json")["final"]["val/bpb"] < 8.5  # trained: near or below uniform


def test_hf_bad_input_is_one_line(folders, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    cases = [
        ([f"model.path={tmp_path / 'empty'}"], "is not a Hugging Face model folder (no config.json)"),
        ([], "give model.path (a local model folder) or model.arch"),
        (["model.arch=llam"], "model.arch=llam: not a transformers model type — did you mean llama?"),
    ]
    for args, message in cases:
        r = cli("train", "model=hf", *TEXT, *args)
        assert r.code == 2 and message in r.text and "Traceback" not in r.text, r.text
    r = cli("train", "model=hf", "model.arch=llama", *TEXT, "model.config={vocab_size:200}")
    assert r.code == 2 and "the model's vocabulary has 200 tokens, fewer than the data's 256" in r.text, r.text
    assert not Path("runs").exists()
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the extra were not installed
    r = cli("train", "model=hf", f"model.path={folders['llama']}", *TEXT)
    assert r.code == 2 and "pip install 'modrun[hf]'" in r.text, r.text
