"""Text corpora for language modeling, byte-level (vocabulary 256: every UTF-8 byte is a token), or for
`text_file` tokenised by a local Hugging Face tokenizer (`data.tokenizer`, tokenize.py).

`python_docs`: the Python reference documentation that every CPython ships (`pydoc_data.topics`, ~466 KB of
English technical prose). `python_code`: the standard library's own `.py` sources. `text_file`: a user's
`.txt` / `.jsonl` file, or a folder of them.

A corpus is cut into chunks of `chunk_bytes`; a fixed `split_seed` sends each chunk to train, val or test, and
each split is its chunks joined in corpus order (with a tokenizer: chunks of `chunk_bytes` characters, each
tokenised on its own). Training draws `windows_per_epoch` random windows of
`block_size + 1` tokens per epoch from a generator seeded by (seed, epoch), so a resumed run draws the same
ones; validation and test read their split once, in consecutive windows.
"""

from __future__ import annotations

import json
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from modrun.components.data.base import Data, Split
from modrun.components.data.tasks import Task, language_modeling
from modrun.core.errors import UserError

VOCAB = 256  # byte-level


@dataclass
class TextSplit(Split):
    """A split of a token stream, served as windows: sample i of an epoch is one window (input, next tokens)."""

    tokens: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.uint8))
    block_size: int = 0
    windows: int = 0  # samples per epoch
    random: bool = False  # train: random windows per (seed, epoch); eval: consecutive windows
    fixed: bool = False  # random windows drawn once (epoch 0's) and kept: sample i is the same window every epoch
    task: Task = field(default_factory=language_modeling)
    _starts: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return self.windows

    def starts(self, seed: int, epoch: int) -> torch.Tensor:
        """Where each window of the epoch begins in `tokens` (on the tokens' device)."""
        if not self.random:
            return torch.arange(self.windows, device=self.tokens.device) * self.block_size
        epoch = 0 if self.fixed else epoch  # a teacher cache keys outputs by sample index (order still reshuffles)
        if (seed, epoch) not in self._starts:
            self._starts.clear()  # one epoch at a time
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 7)
            high = len(self.tokens) - self.block_size  # a window needs block_size + 1 tokens
            self._starts[(seed, epoch)] = torch.randint(0, high, (self.windows,), generator=gen).to(self.tokens.device)
        return self._starts[(seed, epoch)]

    def window(self, idx: torch.Tensor, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of the windows `idx`: (len(idx), block_size) token ids each, targets shifted by one."""
        offsets = self.starts(seed, epoch)[idx.to(self.tokens.device)][:, None]
        pos = offsets + torch.arange(self.block_size + 1, device=self.tokens.device)
        w = self.tokens[pos].long()
        return w[:, :-1], w[:, 1:]

    def to(self, device: torch.device) -> None:
        self.tokens = self.tokens.to(device)
        self._starts.clear()


def split_chunks(
    raw: bytes, val_fraction: float, test_fraction: float, chunk_bytes: int, split_seed: int
) -> tuple[bytes, bytes, bytes]:
    """The corpus as train/val/test: chunks of `chunk_bytes` sent to a split by a seeded permutation."""
    return tuple(raw[:0].join(part) for part in chunk_splits(raw, val_fraction, test_fraction, chunk_bytes, split_seed))


def chunk_splits(
    raw: bytes | str, val_fraction: float, test_fraction: float, chunk_bytes: int, split_seed: int
) -> tuple[list, list, list]:
    """The chunks (of `chunk_bytes` bytes, or characters of a str) of train, val and test, each in corpus order."""
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserError(
            f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must be in (0, 1) and sum "
            "to less than 1"
        )
    if chunk_bytes < 1:
        raise UserError(f"data.chunk_bytes={chunk_bytes}: must be >= 1")
    n = -(-len(raw) // chunk_bytes)
    order = np.random.RandomState(split_seed).permutation(n)
    n_val, n_test = max(1, round(n * val_fraction)), max(1, round(n * test_fraction))
    if n - n_val - n_test < 1:
        raise UserError(f"data: {len(raw)} bytes in {n} chunks of {chunk_bytes} are too few for train/val/test")
    parts = (sorted(order[n_val + n_test :]), sorted(order[:n_val]), sorted(order[n_val : n_val + n_test]))
    return tuple([raw[i * chunk_bytes : (i + 1) * chunk_bytes] for i in part] for part in parts)


def text_data(
    raw: bytes,
    block_size: int,
    windows_per_epoch: int | None,
    val_fraction: float,
    test_fraction: float,
    chunk_bytes: int,
    split_seed: int,
    tokenizer: str | None = None,
    cache_root: Path | None = None,
) -> Data:
    """A language-modeling bundle of `raw`: byte-level, or tokenised by the tokenizer folder `tokenizer` (cached
    under `cache_root`, see tokenize.py)."""
    if block_size < 1:
        raise UserError(f"data.block_size={block_size}: must be >= 1")
    split_args = (val_fraction, test_fraction, chunk_bytes, split_seed)
    if tokenizer is None:
        parts = split_chunks(raw, *split_args)
        tokens = [torch.from_numpy(np.frombuffer(p, dtype=np.uint8).copy()) for p in parts]
        vocab, bytes_per_token, unit = VOCAB, [1.0, 1.0, 1.0], "bytes"
    else:
        from modrun.components.data.tokenize import tokenized_splits  # transformers only for a tokenizer

        # characters, not bytes: no character is cut in two
        splits = chunk_splits(raw.decode("utf-8"), *split_args)
        tokens, vocab, bytes_per_token = tokenized_splits(raw, splits, tokenizer, cache_root, split_args)
        unit = "tokens"
    for name, part in zip(("train", "val", "test"), tokens, strict=True):
        if len(part) < block_size + 1:
            raise UserError(
                f"data.block_size={block_size}: the {name} split has only {len(part)} {unit}; "
                f"use a smaller block_size or a larger corpus"
            )
    train_windows = windows_per_epoch if windows_per_epoch is not None else len(tokens[0]) // block_size
    if train_windows < 1:
        raise UserError(f"data.windows_per_epoch={windows_per_epoch}: must be >= 1")

    def split(i: int, windows: int, random: bool) -> TextSplit:
        task = language_modeling(bytes_per_token[i])  # bits per byte from this split's own bytes and tokens
        return TextSplit(y=torch.zeros(0), tokens=tokens[i], block_size=block_size, windows=windows, random=random,
                         task=task)  # fmt: skip

    train = split(0, int(train_windows), True)
    val, test = (split(i, (len(tokens[i]) - 1) // block_size, False) for i in (1, 2))
    return Data(
        train, val, test, channels=0, image_size=0, num_classes=vocab, task=train.task,
        vocab_size=vocab, block_size=block_size, tokenizer=str(tokenizer or "byte-level"),
    )  # fmt: skip


def python_docs(
    block_size: int = 128,
    windows_per_epoch: int | None = None,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    chunk_bytes: int = 4096,
    split_seed: int = 0,
) -> Data:
    """The Python reference documentation shipped with CPython (pydoc_data.topics), byte-level."""
    from pydoc_data.topics import topics  # a plain dict of strings: nothing runs but its definition

    raw = "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")
    return text_data(raw, block_size, windows_per_epoch, val_fraction, test_fraction, chunk_bytes, split_seed)


def python_code(
    block_size: int = 256,
    windows_per_epoch: int | None = None,
    max_bytes: int | None = 16_000_000,
    val_fraction: float = 0.02,
    test_fraction: float = 0.02,
    chunk_bytes: int = 16384,
    split_seed: int = 0,
) -> Data:
    """The standard library's `.py` sources (tests and site-packages left out), sorted by path, byte-level."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not ({"test", "tests", "site-packages"} & set(p.parts)))
    out, size = [], 0
    for p in files:
        if max_bytes is not None and size >= max_bytes:
            break
        data = p.read_bytes()
        out.append(data)
        size += len(data) + 2
    raw = b"\n\n".join(out)[: max_bytes if max_bytes is not None else None]
    return text_data(raw, block_size, windows_per_epoch, val_fraction, test_fraction, chunk_bytes, split_seed)


def read_text(path: Path) -> bytes:
    """The UTF-8 bytes of a .txt file, or of the `text` fields of a .jsonl file, checked to be text."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"data.path: {path} is not UTF-8 text (byte offset {e.start})") from None
    if path.suffix == ".jsonl":
        lines = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise UserError(f"data.path: {path} line {n} is not JSON") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UserError(f"data.path: {path} line {n} has no string field 'text'")
            lines.append(record["text"])
        raw = "\n\n".join(lines).encode("utf-8")
    return raw


def text_file(
    path: str = "???",
    block_size: int = 128,
    windows_per_epoch: int | None = None,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    chunk_bytes: int = 4096,
    split_seed: int = 0,
    tokenizer: str | None = None,
) -> Data:
    """A user's .txt / .jsonl file, or every such file under a folder (sorted): byte-level, or tokenised by a
    Hugging Face tokenizer folder (`tokenizer`), its tokens cached next to the data."""
    base = Path(path).expanduser()
    if base.is_dir():
        files = sorted(p for p in base.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
        if not files:
            raise UserError(f"data.path: no .txt or .jsonl files under {base}")
    elif base.is_file():
        files = [base]
    else:
        raise UserError(f"data.path: {base} does not exist")
    raw = b"\n\n".join(read_text(p) for p in files)
    if not raw.strip():
        raise UserError(f"data.path: {base} holds no text")
    cache_root = base if base.is_dir() else base.parent
    split_args = (val_fraction, test_fraction, chunk_bytes, split_seed)
    return text_data(raw, block_size, windows_per_epoch, *split_args, tokenizer=tokenizer, cache_root=cache_root)
