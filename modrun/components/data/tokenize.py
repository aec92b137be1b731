"""Text tokenised by a Hugging Face tokenizer from a local folder (`data.tokenizer=DIR`, extra `modrun[hf]`).

Each split is tokenised once and kept as a memory-mapped token file next to the data, in
`.modrun_tokens/<key>/{train,val,test}.u16` (vocabularies up to 65,536; `.u32` above) with a `meta.json`. The key
is a SHA-256 of the tokenizer folder's files, the corpus bytes and the split settings, so another tokenizer, an
edited corpus or other fractions get their own files, and a second run (or a resume) reads them instead of
tokenising again. A damaged cache is tokenised again; a data folder that cannot be written is tokenised in memory.
Nothing is downloaded and no code from the folder runs (`local_files_only`, no `trust_remote_code`).
"""

from __future__ import annotations

# imports inside functions here defer torch: `vocab_size` resolves configs before torch is loaded
import functools
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from modrun.core.errors import UserError

if TYPE_CHECKING:
    import torch

log = logging.getLogger("modrun")

FORMAT = 1  # bump when the files' layout changes: old caches are then simply not found
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")  # one of them makes a tokenizer
SPLITS = ("train", "val", "test")


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer of a local folder, or a UserError naming `data.tokenizer`."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(f"data.tokenizer={path}: no such folder")
    if not any((folder / name).is_file() for name in VOCAB_FILES):
        raise UserError(f"data.tokenizer={path}: not a tokenizer folder (it has none of {', '.join(VOCAB_FILES)})")
    try:
        import transformers
    except ImportError:
        raise UserError("data.tokenizer needs the transformers package: pip install 'modrun[hf]'") from None
    transformers.utils.logging.set_verbosity_error()  # no "sequence longer than model_max_length" warnings
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - whatever the folder holds, the user gets one line
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"data.tokenizer={path}: cannot be loaded as a tokenizer ({detail})") from None


@functools.lru_cache(maxsize=8)
def _vocab_of(folder: str, given: str) -> int:
    return len(load_tokenizer(given))


def vocab_size(tokenizer: str | None) -> int:
    """`${modrun_vocab:${data.tokenizer}}`: 256 byte-level, else the tokenizer's size (added tokens included)."""
    if tokenizer in (None, "", "null"):
        return 256
    return _vocab_of(str(Path(str(tokenizer)).expanduser().resolve()), str(tokenizer))


# the files a tokenizer is read from (not a model folder's weights, which may share the folder)
TOKENIZER_FILES = ("*.json", "*.txt", "*.model", "*.tiktoken")


def _key(raw: bytes, folder: Path, split_args: tuple) -> str:
    digest = hashlib.sha256(f"modrun-tokens-{FORMAT}-{split_args}".encode())
    files = sorted({p for pattern in TOKENIZER_FILES for p in folder.glob(pattern) if p.is_file()})
    for f in files:  # streamed: a vocabulary file can be large
        with f.open("rb") as fh:
            digest.update(f.name.encode() + b"\0" + hashlib.file_digest(fh, "sha256").digest())
    digest.update(hashlib.sha256(raw).digest())
    return digest.hexdigest()[:32]


def _tokenize(splits: tuple[list[str], ...], tokenizer: Any) -> tuple[list[np.ndarray], list[int]]:
    """Token ids and UTF-8 bytes of each split, each chunk tokenised on its own."""
    ids, sizes = [], []
    for chunks in splits:
        encoded = tokenizer(chunks, add_special_tokens=False)["input_ids"] if chunks else []
        ids.append(np.fromiter((t for seq in encoded for t in seq), dtype=np.int64))
        sizes.append(sum(len(c.encode("utf-8")) for c in chunks))
    return ids, sizes


def _read_cache(folder: Path, vocab: int) -> tuple[list[torch.Tensor], list[int]] | None:
    """The cached splits (memory-mapped, copy-on-write), or None when absent or damaged."""
    import torch

    from modrun.core.records import RecordError, read_json

    if not (folder / "meta.json").is_file():
        return None
    try:
        meta = read_json(folder / "meta.json")
        dtype, ext = (np.uint16, "u16") if meta["dtype"] == "uint16" else (np.int32, "u32")
        out = []
        for name, count in zip(SPLITS, meta["tokens"], strict=True):
            path = folder / f"{name}.{ext}"
            if meta["vocab"] != vocab or path.stat().st_size != int(count) * np.dtype(dtype).itemsize:
                raise ValueError(f"{path} does not match meta.json")
            ids = np.memmap(path, dtype=dtype, mode="c") if count else np.zeros(0, dtype=dtype)
            if count and not 0 <= int(ids.min()) <= int(ids.max()) < vocab:  # a tampered file: no bad index later
                raise ValueError(f"{path} holds token ids outside the vocabulary")
            out.append(torch.from_numpy(ids))
        return out, [int(b) for b in meta["bytes"]]
    except (RecordError, KeyError, TypeError, ValueError, OSError) as e:
        log.warning(f"token cache {folder} is damaged ({e}); tokenising again")
        return None


def _write_cache(folder: Path, ids: list[np.ndarray], sizes: list[int], vocab: int, tokenizer: str) -> bool:
    """Write the splits into a temp folder, then rename it into place: a kill leaves no half cache."""
    dtype, ext = ("uint16", "u16") if vocab <= 65536 else ("uint32", "u32")
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        for name, a in zip(SPLITS, ids, strict=True):
            a.astype(dtype).tofile(tmp / f"{name}.{ext}")
        meta = {"dtype": dtype, "vocab": vocab, "tokens": [len(a) for a in ids], "bytes": sizes, "tokenizer": tokenizer}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        shutil.rmtree(folder, ignore_errors=True)  # a damaged one
        os.replace(tmp, folder)
        return True
    except OSError as e:  # a read-only data folder: the run goes on with the tokens in memory
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning(f"cannot cache tokens in {folder.parent} ({e.strerror or e}); tokenised in memory")
        return False


def tokenized_splits(
    raw: bytes, splits: tuple[list[str], ...], tokenizer: str, cache_root: Path | None, split_args: tuple
) -> tuple[list[torch.Tensor], int, list[float]]:
    """(train, val, test) token tensors of the text chunks `splits` (cut from `raw` by `split_args`), the
    vocabulary size and each split's UTF-8 bytes per token."""
    import torch

    vocab = vocab_size(tokenizer)  # cached: validation read it already; the tokenizer itself only on a miss
    folder = Path(cache_root or ".") / ".modrun_tokens" / _key(raw, Path(tokenizer).expanduser(), split_args)
    cached = _read_cache(folder, vocab)
    if cached is None:
        ids, sizes = _tokenize(splits, load_tokenizer(tokenizer))
        if cache_root is not None and _write_cache(folder, ids, sizes, vocab, str(tokenizer)):
            cached = _read_cache(folder, vocab)
            log.info(f"tokenised {sum(map(len, ids)):,} tokens with {tokenizer}; cached in {folder}")
        if cached is None:
            cached = [torch.from_numpy(a.astype(np.int32)) for a in ids], sizes
    tokens, sizes = cached
    return tokens, vocab, [b / max(len(t), 1) for t, b in zip(tokens, sizes, strict=True)]
