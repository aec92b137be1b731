"""Checkpoints: plain dicts of tensors and numbers, written atomically, loaded with weights_only=True.

Each `X.pt` has a sidecar `X.pt.sha256` (the `sha256sum` format) holding the SHA-256 of its bytes, and
`last.pt` keeps its predecessor as `last.prev.pt`. `save` orders its writes so that whenever a kill lands,
last.pt exists complete and at least one checkpoint on disk matches a recorded checksum:

    1. last.prev.pt.sha256 := hash of the current last.pt   (only if it verifies: a bad file is not kept)
    2. last.prev.pt := the current last.pt                   (hard link or copy, then rename: atomic)
    3. last.pt.sha256 := hash of the new bytes                (a checksum ahead of its file is harmless)
    4. last.pt := the new bytes                               (atomic: temp file + rename)

A file verifies when its hash is recorded in its own sidecar or in its predecessor's: between steps 3 and 4
last.pt still holds the checkpoint that step 2 kept, a complete one.

`load_last` resumes from last.pt, else from last.prev.pt, saying why in one log line.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modrun.core.errors import UserError
from modrun.core.runfolder import atomic_write

log = logging.getLogger("modrun")
LAST = "last.pt"


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from (python, numpy, torch CPU and CUDA)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["key"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def previous_path(path: Path) -> Path:
    """last.pt -> last.prev.pt"""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _recorded(path: Path) -> set[str]:
    """Checksums that vouch for `path`: its sidecar's and its predecessor's (see the module docstring)."""
    sidecars = (checksum_path(path), checksum_path(previous_path(path)))
    return {(s.read_text().split() or [""])[0] for s in sidecars if s.is_file()}


def _link_or_copy(src: Path, dst: Path, data: bytes | None = None) -> None:
    """dst := src's bytes atomically, src untouched: a hard link costs no copy; a copy where links fail."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        atomic_write(dst, src.read_bytes() if data is None else data)
        return
    os.replace(tmp, dst)


# what this process last wrote at each path: (inode, size, mtime) -> digest, so that keeping last.pt's
# predecessor need not read and hash the file again (a large model's checkpoint costs seconds to hash)
_WRITTEN: dict[Path, tuple[tuple[int, int, int], str]] = {}


def _stat_key(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def _current_digest(path: Path) -> str:
    """The SHA-256 of the file at `path`: remembered when this process wrote it and nothing has touched it."""
    known = _WRITTEN.get(path.resolve())
    if known is not None and known[0] == _stat_key(path):
        return known[1]
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save(path: Path, state: dict[str, Any], keep_previous: bool | None = None, also: tuple[Path, ...] = ()) -> None:
    """Write `state` atomically with its checksum; `last.pt` (or `keep_previous=True`) keeps its predecessor.

    `also` names further checkpoints of the same state (best.pt and last.pt at an epoch end), written after
    `path` as hard links to its bytes: serialised and hashed once."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    first = Path(path)
    for i, target in enumerate((first, *map(Path, also))):
        keep = keep_previous if i == 0 and keep_previous is not None else target.name == LAST
        _write(target, data, digest, keep, None if i == 0 else first)


def _write(path: Path, data: bytes, digest: str, keep_previous: bool, same_as: Path | None) -> None:
    """One checkpoint file and its sidecar, in the order the module docstring gives; `same_as`: a file already
    holding `data`, linked rather than written again."""
    if keep_previous and path.is_file():
        current = _current_digest(path)
        if current in _recorded(path):  # the write order is explained in the module docstring
            prev = previous_path(path)
            atomic_write(checksum_path(prev), f"{current}  {prev.name}\n")
            _link_or_copy(path, prev)
    checksum = (checksum_path(path), f"{digest}  {path.name}\n")
    if path.is_file() and not checksum_path(path).is_file():  # a checkpoint from before checksums: a checksum
        _put(path, data, same_as)  # ahead of it would make it look corrupt
        atomic_write(*checksum)
    else:
        atomic_write(*checksum)
        _put(path, data, same_as)
    _WRITTEN[path.resolve()] = (_stat_key(path), digest)


def _put(path: Path, data: bytes, same_as: Path | None) -> None:
    if same_as is None:
        atomic_write(path, data)
    else:
        _link_or_copy(same_as, path, data)


def load(path: Path, map_location: str | torch.device = "cpu", root: Path | None = None) -> dict[str, Any]:
    """A checkpoint checked against its checksum (when it has one) and unpickled with weights_only=True.

    Raises UserError naming the file (relative to `root`) when it is missing, corrupt or holds anything other
    than tensors and plain containers: loading never runs code from a file."""
    path = Path(path)
    name = _shown(path, root)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {name}: {e.strerror or e}") from None
    recorded = _recorded(path)
    if recorded and hashlib.sha256(data).hexdigest() not in recorded:  # no checksum at all: an older checkpoint
        raise UserError(f"{name} is corrupt (checksum mismatch)")
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # what weights_only refuses: globals, classes, code
        found = re.search(r"Unsupported (?:global: GLOBAL |operand )?(\S+)", str(e))
        what = found.group(1) if found else _first_sentence(e)
        raise UserError(f"{name} is refused: it holds pickled objects other than tensors: {what}") from None
    except Exception as e:  # noqa: BLE001 - a truncated zip, a foreign file: bad input, said in one line
        raise UserError(f"{name} is corrupt (cannot be read: {_first_sentence(e)})") from None


def load_last(ckpt_dir: Path, map_location: str | torch.device = "cpu", root: Path | None = None) -> dict | None:
    """The newest usable of last.pt and last.prev.pt; None when neither exists (nothing saved yet).

    A corrupt or missing last.pt falls back to last.prev.pt with one log line; both unusable is bad input."""
    last = Path(ckpt_dir) / LAST
    prev = previous_path(last)
    if not last.exists() and not prev.exists():
        return None
    problems = []
    for path in (last, prev):
        if not path.exists():
            problems.append(f"{_shown(path, root)} is missing")
            continue
        try:
            ckpt = load(path, map_location, root)
        except UserError as e:
            problems.append(e.messages[0])
            continue
        if problems:
            log.warning(f"{problems[0]}; resuming from {_shown(path, root)} (step {ckpt['state']['step']})")
        return ckpt
    raise UserError(f"no usable checkpoint to resume from: {'; '.join(problems)}")


def _first_sentence(e: Exception) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text.split(". ")[0].rstrip(".")


def _shown(path: Path, root: Path | None) -> str:
    try:
        return str(path.relative_to(root)) if root is not None else str(path)
    except ValueError:
        return str(path)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; harmless on CPU
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=False)
        torch.backends.cudnn.benchmark = False
