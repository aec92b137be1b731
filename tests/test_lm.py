"""Language modeling and vision transformers: the task's metrics against their formulas, text windows, the
`gpt` and `vit` models, and runs through the real CLI (train, eval, exact resume, bad input)."""

import math
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import cli, cli_subprocess, only_run, read_json
from omegaconf import OmegaConf
from test_resume import _assert_identical, _env, _start, _wait_for_step

from modrun.components.data.base import Preprocess, batches
from modrun.components.data.tasks import CLASSIFICATION, language_modeling
from modrun.components.data.text import python_docs, split_chunks, text_data
from modrun.components.models.gpt import GPT
from modrun.components.models.vit import ViT
from modrun.engine.evaluation import evaluate

TINY = ["model=gpt", "data=python_docs", "model.n_layer=1", "model.n_embd=32", "model.n_head=2"]
TINY += ["data.block_size=32", "data.windows_per_epoch=128", "data.batch_size=16", "trainer.progress=false"]
TINY += ["optim=adamw", "optim.lr=3e-3"]


@pytest.mark.parametrize("batch", [16, 128])
def test_language_modeling_metrics_are_the_formulas(batch):
    """loss: mean next-token cross-entropy in nats; ppl = e^loss; bpb = loss / ln 2 (one byte per token);
    top1: % of tokens whose most likely next token is the true one. Written out with loops over tokens."""
    torch.manual_seed(0)
    logits, y = torch.randn(batch, 8, 11, dtype=torch.float64), torch.randint(0, 11, (batch, 8))
    task = language_modeling(1.0)
    got = task.metrics({k: float(v) for k, v in task.sums(logits, y).items()})
    nll, right, n = 0.0, 0, 0
    for b in range(batch):
        for t in range(8):
            row = logits[b, t].tolist()
            log_z = math.log(sum(math.exp(v) for v in row))
            nll += log_z - row[y[b, t]]
            right += int(max(range(11), key=lambda c: row[c]) == y[b, t])
            n += 1
    assert got["loss"] == pytest.approx(nll / n, rel=1e-10)
    assert got["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-10)
    assert got["bpb"] == pytest.approx(nll / n / math.log(2), rel=1e-10)
    assert got["top1"] == pytest.approx(100.0 * right / n, rel=1e-12)
    assert task.best == "loss" and not task.maximize and CLASSIFICATION.maximize
    assert task.loss(logits, y).item() == pytest.approx(nll / n, rel=1e-10)


def test_text_splits_partition_the_corpus_and_windows_are_next_tokens():
    raw = bytes(range(256)) * 40
    parts = split_chunks(raw, 0.1, 0.1, 100, split_seed=3)
    assert sum(map(len, parts)) == len(raw) and all(parts)
    assert parts == split_chunks(raw, 0.1, 0.1, 100, split_seed=3) != split_chunks(raw, 0.1, 0.1, 100, 4)
    data = text_data(raw, 16, 50, 0.1, 0.1, 100, 3)
    x, y, idx = next(batches(data.train, 50, seed=1, epoch=2, shuffle=True))
    assert x.shape == y.shape == (50, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # the targets are the inputs shifted by one token
    again, *_ = next(batches(data.train, 50, seed=1, epoch=2, shuffle=True))
    other, *_ = next(batches(data.train, 50, seed=1, epoch=3, shuffle=True))
    assert torch.equal(x, again) and not torch.equal(x, other)  # a pure function of (seed, epoch)
    val = torch.cat([xb for xb, _, _ in batches(data.val, 7)])  # consecutive windows over the whole split
    tokens = data.val.tokens.long()
    assert torch.equal(val.flatten(), tokens[: val.numel()]) and len(tokens) - val.numel() <= 16


def test_python_docs_is_the_bundled_reference_documentation():
    data = python_docs(block_size=64)
    total = sum(len(s.tokens) for s in (data.train, data.val, data.test))
    assert 400_000 < total < 600_000 and data.vocab_size == 256 and data.task.name == "language_modeling"
    assert 0.04 < len(data.val.tokens) / total < 0.06
    assert len(data.train) == len(data.train.tokens) // 64
    assert b"The" in bytes(data.train.tokens[:20000].tolist())


def test_evaluate_on_text_is_the_mean_over_every_token():
    torch.manual_seed(0)
    data = text_data(bytes(range(256)) * 20, 16, 10, 0.1, 0.1, 64, 0)
    model = GPT(256, 16, n_layer=1, n_head=2, n_embd=16).eval()
    got = evaluate(model, data.val, Preprocess(data, torch.device("cpu")), 5, torch.device("cpu"))
    nll, n = 0.0, 0
    for x, y, _ in batches(data.val, 1000):
        nll += F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").item()
        n += y.numel()
    assert got["loss"] == pytest.approx(nll / n, rel=1e-5) and got["bpb"] == pytest.approx(nll / n / math.log(2))


@pytest.mark.parametrize("pos", ["learned", "rotary"])
def test_gpt_is_causal_and_ties_its_head(pos):
    torch.manual_seed(0)
    model = GPT(50, 12, n_layer=2, n_head=2, n_embd=16, pos=pos).eval()
    x = torch.randint(0, 50, (3, 12))
    changed = x.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 50
    a, b = model(x), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])  # no position sees a later token
    assert not torch.allclose(a[:, 7:], b[:, 7:])
    keys = set(model.state_dict())
    assert "tok_emb.weight" in keys and not any(k.startswith("head") for k in keys)  # one copy of the tied matrix
    assert model.feature_layers == ("blocks.0", "blocks.1")


def test_vit_takes_images_and_names_its_blocks():
    model = ViT(1, 10, 8, patch=2, depth=2, heads=2, dim=16)
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    assert model.feature_layers == ("blocks.0", "blocks.1") and model.embedding_layer == "pool"
    with pytest.raises(ValueError, match="not a multiple of patch"):
        ViT(1, 10, 8, patch=3)


def test_train_and_eval_a_gpt_on_python_docs():
    r = cli("train", *TINY, "trainer.epochs=2")
    assert r.code == 0, r.text
    run = only_run()
    summary = read_json(run / "summary.json")
    final, best = summary["final"], summary["best"]
    assert {"val/loss", "val/ppl", "val/bpb", "val/top1", "test/loss", "test/bpb"} <= set(final)
    assert final["val/bpb"] == pytest.approx(final["val/loss"] / math.log(2))
    assert final["val/bpb"] < 8.0  # better than uniform over bytes (8 bits)
    # the best epoch is the one of lowest val loss
    vals = [m for m in map(eval_json, (run / "metrics.jsonl").read_text().splitlines()) if m["split"] == "val"]
    lowest = min(vals, key=lambda m: m["loss"])
    assert best["epoch"] == lowest["epoch"] and best["val/loss"] == pytest.approx(lowest["loss"])
    assert summary["macs"] > 0 and summary["params"] > 0
    assert "bpb" in r.text.splitlines()[-1]  # the result line
    e = cli("eval", str(run))
    assert e.code == 0, e.text
    assert "bpb" in e.text


def eval_json(line: str) -> dict:
    import json

    return json.loads(line)


def test_vit_trains_on_digits():
    r = cli("train", "model=vit", "model.depth=1", "model.dim=16", "trainer.epochs=1", "trainer.progress=false")
    assert r.code == 0, r.text
    assert read_json(only_run() / "summary.json")["best"]["val/top1"] > 10


def test_a_text_file_of_ones_own(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    r = cli("train", *TINY, "data=text_file", f"data.path={corpus}", "data.chunk_bytes=256", "trainer.epochs=1")
    assert r.code == 0, r.text
    cfg = OmegaConf.load(only_run() / "config.yaml")
    assert cfg.data.name == "text_file" and cfg.data.path == str(corpus)


@pytest.mark.parametrize(
    "args, message",
    [
        (["model=gpt"], "model=gpt is a language model but data=digits is classification; choose data=python_docs"),
        (["model=vit", "data=python_docs"], "model=vit classifies images but data=python_docs is language_modeling"),
        (
            ["model=gpt", "data=python_docs", "model.block_size=64"],
            "data.block_size=128 is longer than model.block_size",
        ),
        (["model=gpt", "data=python_docs", "model.pos=alibi"], "pos=alibi: expected one of learned, rotary"),
    ],
)
def test_models_and_data_of_different_tasks_are_clear_errors(args, message):
    r = cli("train", *args)
    assert r.code == 2 and message in r.text, r.text
    assert "Traceback" not in r.text and not Path("runs").exists()


def test_bad_text_files_are_clear_errors(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"fine text " * 10 + b"\xff\xfe broken")
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    for name, message in [
        ("bad.txt", "is not UTF-8 text (byte offset 100)"),
        ("empty.txt", "holds no text"),
        ("bad.jsonl", "line 2 has no string field 'text'"),
        ("missing.txt", "no such file or directory"),
    ]:
        r = cli("train", *TINY, "data=text_file", f"data.path={tmp_path / name}")
        assert r.code == 2 and message in r.text, (name, r.text)
    assert not Path("runs").exists()


SLOW_GPT = """
import os, time
from modrun.components.models.gpt import GPT
from modrun.core.registry import MODELS

class SlowGPT(GPT):
    def forward(self, idx):
        time.sleep(float(os.environ.get("SLOW", "0")))
        return super().forward(idx)

@MODELS.register("slow_gpt")
def slow_gpt(vocab_size: int, block_size: int, n_layer: int = 1, n_head: int = 2, n_embd: int = 32,
             dropout: float = 0.0, pos: str = "learned", tie_weights: bool = True, mlp_ratio: float = 4.0):
    return SlowGPT(vocab_size, block_size, n_layer, n_head, n_embd, dropout, pos, tie_weights, mlp_ratio)

slow_gpt.task = "language_modeling"  # what the data must be (checked before any work)
"""


def test_killed_language_model_run_resumes_bitwise(tmp_path):
    """Random windows, dropout and the optimiser state all continue exactly after a SIGKILL."""
    (tmp_path / "slowlm.py").write_text(SLOW_GPT)
    args = [*TINY, "+imports=[slowlm]", "model.name=slow_gpt", "model.dropout=0.1", "trainer.epochs=2"]
    args += ["trainer.checkpoint_every_steps=3", "trainer.log_every_steps=1", "seed=5"]
    ref = cli_subprocess("train", "--runs-dir", "ref", *args, cwd=tmp_path, env=_env(tmp_path, 0))
    assert ref.returncode == 0, ref.stderr
    proc = _start(tmp_path, "killed", 0.05, "train", "--runs-dir", "killed", *args)
    run = _wait_for_step(tmp_path / "killed", 11, proc)  # epoch 2 (8 steps an epoch)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = cli_subprocess("resume", str(run), "+imports=[slowlm]", cwd=tmp_path, env=_env(tmp_path, 0))
    assert done.returncode == 0, done.stderr
    _assert_identical(only_run(runs_dir=tmp_path / "ref"), run)
