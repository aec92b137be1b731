"""`data=text_file data.tokenizer=DIR`: a local Hugging Face tokenizer (a tiny BPE trained here, saved with
save_pretrained, never the hub), its tokens cached next to the data, through the real CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import cli, only_run, read_json
from omegaconf import OmegaConf

transformers = pytest.importorskip("transformers")

GPT = ["model=gpt", "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "data.block_size=32"]
RUN = [*GPT, "data.windows_per_epoch=64", "data.batch_size=16", "trainer.epochs=1", "trainer.progress=false"]
VOCAB = 300


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """60 KB of the bundled docs (with non-ASCII text) and a byte-level BPE tokenizer of 300 tokens trained on it."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    root = tmp_path_factory.mktemp("tok")
    text = "\n\n".join(topics[k] for k in sorted(topics))[:60_000] + "\nnaïve café — ünïcode ✓\n" * 20
    (root / "data").mkdir()
    (root / "data" / "corpus.txt").write_text(text, encoding="utf-8")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        [text], trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>"], initial_alphabet=alphabet)
    )
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(root / "tok")
    return {"text": root / "data" / "corpus.txt", "tok": root / "tok", "root": root}


def _args(corpus: dict[str, Path]) -> list[str]:
    return ["data=text_file", f"data.path={corpus['text']}", f"data.tokenizer={corpus['tok']}"]


def _cache(corpus: dict[str, Path]) -> Path:
    folders = list((corpus["text"].parent / ".modrun_tokens").iterdir())
    assert len(folders) == 1, folders
    return folders[0]


def test_a_tokenised_corpus_trains_with_the_tokenizers_vocabulary_and_is_cached(corpus):
    import shutil

    shutil.rmtree(corpus["text"].parent / ".modrun_tokens", ignore_errors=True)
    r = cli("train", *RUN, *_args(corpus))
    assert r.code == 0, r.text
    run = only_run()
    tok = transformers.AutoTokenizer.from_pretrained(str(corpus["tok"]), local_files_only=True)
    assert OmegaConf.load(run / "config.yaml").data.vocab_size == len(tok) == VOCAB  # filled in from the folder
    cache = _cache(corpus)
    meta = read_json(cache / "meta.json")
    assert meta["dtype"] == "uint16" and meta["vocab"] == VOCAB
    # the cached val split is exactly the tokenizer's own encoding of the val chunks, in corpus order
    from modrun.components.data.text import chunk_splits

    text = corpus["text"].read_text(encoding="utf-8")
    val_chunks = chunk_splits(text, 0.05, 0.05, 4096, 0)[1]
    expected = [t for c in val_chunks for t in tok(c, add_special_tokens=False)["input_ids"]]
    assert np.fromfile(cache / "val.u16", dtype=np.uint16).tolist() == expected
    assert (cache / "train.u16").stat().st_size == 2 * meta["tokens"][0]
    # bits per byte from the split's own bytes: loss / ln 2 * tokens / bytes
    final = read_json(run / "summary.json")["final"]
    val_bytes = sum(len(c.encode("utf-8")) for c in val_chunks)
    assert final["val/bpb"] == pytest.approx(final["val/loss"] / math.log(2) * len(expected) / val_bytes, rel=1e-6)
    # a second run reads the cache instead of tokenising again, and sees the same tokens
    stamp = (cache / "train.u16").stat().st_mtime_ns
    again = cli("train", *RUN, *_args(corpus), "--runs-dir", "again")
    assert again.code == 0 and "tokenised" not in again.text, again.text
    assert (cache / "train.u16").stat().st_mtime_ns == stamp
    second = read_json(only_run(runs_dir=Path("again")) / "summary.json")["final"]
    assert second["val/loss"] == final["val/loss"]
    assert cli("eval", str(run)).code == 0


def test_a_damaged_cache_is_tokenised_again(corpus):
    assert cli("train", *RUN, *_args(corpus), "trainer.epochs=0").code == 0
    cache = _cache(corpus)
    reference = (cache / "train.u16").read_bytes()
    (cache / "train.u16").write_bytes(reference[:100])
    r = cli("train", *RUN, *_args(corpus), "trainer.epochs=0", "--runs-dir", "again")
    assert r.code == 0, r.text
    assert (_cache(corpus) / "train.u16").read_bytes() == reference


def test_the_data_cache_can_be_unwritable_and_large_vocabularies_use_uint32(corpus, tmp_path):
    from modrun.components.data.tokenize import _read_cache, _write_cache, tokenized_splits

    blocked = tmp_path / "afile"
    blocked.write_text("a file where the cache folder would go")
    raw = corpus["text"].read_bytes()
    from modrun.components.data.text import chunk_splits

    splits = chunk_splits(raw.decode("utf-8"), 0.05, 0.05, 4096, 0)
    tokens, vocab, per_token = tokenized_splits(raw, splits, str(corpus["tok"]), blocked, (0.05, 0.05, 4096, 0))
    assert vocab == VOCAB and len(tokens[0]) > 10_000 and all(1.0 < b < 4.0 for b in per_token)
    ids = [np.array([0, 70_000, 123_456]), np.array([5]), np.array([65_536, 1])]
    assert _write_cache(tmp_path / "big", ids, [3, 1, 2], 200_000, "big")
    assert json.loads((tmp_path / "big" / "meta.json").read_text())["dtype"] == "uint32"
    back, sizes = _read_cache(tmp_path / "big", 200_000)
    assert [t.tolist() for t in back] == [a.tolist() for a in ids] and sizes == [3, 1, 2]


def test_an_hf_model_reads_the_tokenizers_vocabulary(corpus):
    config = "model.config={hidden_size:32,intermediate_size:64,num_hidden_layers:1,num_attention_heads:2}"
    r = cli("train", "model=hf", "model.arch=llama", config, *RUN[4:], *_args(corpus), "data.block_size=32")
    assert r.code == 0, r.text
    assert OmegaConf.load(only_run() / "config.yaml").model.vocab_size == VOCAB


@pytest.mark.parametrize(
    ("tokenizer", "expected"),
    [
        ("nowhere", "data.tokenizer=nowhere: no such folder"),
        ("empty", "not a tokenizer folder"),
        ("bad", "cannot be loaded"),
    ],
)
def test_a_bad_tokenizer_folder_is_one_line(corpus, tmp_path, tokenizer, expected):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    args = ["data=text_file", f"data.path={corpus['text']}", f"data.tokenizer={tokenizer}"]
    r = cli("train", *RUN, *args)
    assert r.code == 2 and "Traceback" not in r.text, r.text
    lines = r.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modrun: error: ") and expected in lines[0], lines
    assert not Path("runs").exists()


def test_a_teacher_of_another_tokenizer_is_refused_naming_both(corpus):
    """Token-level KD needs one vocabulary: a teacher trained on the tokenised corpus cannot teach byte-level."""
    assert cli("train", *RUN, *_args(corpus), "trainer.epochs=0", "--runs-dir", "t").code == 0
    teacher = only_run(runs_dir=Path("t"))
    student = [*GPT, "data=python_docs", "model@teacher=gpt", "trainer.epochs=1", "trainer.progress=false"]
    r = cli("distill", *student, f"teacher.run={teacher}")
    assert r.code == 2 and "Traceback" not in r.text, r.text
    line = r.err.strip().splitlines()[-1]
    assert (
        line.startswith("modrun: error: teacher.run=") and f"reads {VOCAB} tokens (tokenizer: {corpus['tok']})" in line
    )
    assert "this data has 256 (tokenizer: byte-level)" in line, line
    assert not list(Path("runs").glob("distill/*"))  # the folder made before the teacher was read is gone
