"""Data found bad before any work (validation calls `check_data`): a file dataset's problems that would otherwise
surface late, as a traceback in the middle of a run, with its folder half made.

image_folder: files that are empty or not images, class folders without images, a split that the fractions
leave empty or a class left without training images. cifar10: labels outside 0-9. Each problem names the file
or the class. Reading image headers costs about a millisecond a file; pixels are not decoded.
"""

from __future__ import annotations

# imports inside functions here defer torch (components.build): validation imports this module before the build
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from modrun.components.data.builtin import stratified_split
from modrun.components.data.image_folder import EXTENSIONS, _scan

MAX_LISTED = 3  # bad files named in a message; the rest are counted


def check_data(cfg: DictConfig) -> list[str]:
    """One line per problem with the data of `cfg` (only datasets read from files are looked at)."""
    from modrun.components.build import RUNNER_KEYS, builder_args
    from modrun.core.registry import DATASETS

    data = cfg.get("data")
    check = CHECKS.get(str(data.get("name"))) if isinstance(data, DictConfig) else None
    if check is None:
        return []
    try:
        args = builder_args(DATASETS.get(data.name), data, RUNNER_KEYS)
    except Exception:  # noqa: BLE001 - an unresolvable node is reported by the other checks
        return []
    return check(**args)


def _image_folder(
    path: str, val_fraction: float = 0.1, test_fraction: float = 0.1, split_seed: int = 0, **_: Any
) -> list[str]:
    root = Path(path).expanduser()
    if not root.is_dir():
        return []  # the builder says so
    if (root / "train").is_dir():
        val_dir = next((root / d for d in ("val", "valid", "validation") if (root / d).is_dir()), None)
        folders = [
            root / "train",
            *([val_dir] if val_dir else []),
            *([root / "test"] if (root / "test").is_dir() else []),
        ]
        classes = _scan(root / "train")[2]
        problems = [m for folder in folders for m in _folder_problems(folder, classes, path)]
        for folder in folders[1:]:
            if not problems and not _scan(folder, classes)[0]:
                problems.append(f"data.path: {folder} holds no images: its split would be empty")
        return problems
    problems = _folder_problems(root, None, path)
    if problems:
        return problems
    files, labels, classes = _scan(root)
    if len(classes) < 2 or not files:
        return []  # the builder says so
    return _split_problems(np.array(labels), classes, float(val_fraction), float(test_fraction), int(split_seed))


def _folder_problems(folder: Path, classes: list[str] | None, shown: str) -> list[str]:
    """Class folders without images, and files that are empty or not readable as images."""
    files, labels, classes = _scan(folder, classes)
    counts = np.bincount(np.array(labels, dtype=np.int64), minlength=len(classes))
    problems = [
        f"data.path: class '{c}' ({folder / c}) holds no images ({', '.join(sorted(EXTENSIONS))})"
        for c, n in zip(classes, counts, strict=True)
        if n == 0 and (folder / c).is_dir()
    ]
    bad = [(f, why) for f in files if (why := _unreadable(f))]
    for f, why in bad[:MAX_LISTED]:
        problems.append(f"data.path: {f} is {why}")
    if len(bad) > MAX_LISTED:
        problems.append(f"data.path: {len(bad) - MAX_LISTED} more bad image files under {shown}")
    return problems


def _unreadable(file: Path) -> str | None:
    from PIL import Image, UnidentifiedImageError

    try:
        if file.stat().st_size == 0:
            return "empty (0 bytes)"
        with Image.open(file) as img:
            img.verify()  # the header and the file's structure; the pixels are decoded later
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        return f"not a readable image ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return None


def _split_problems(labels: np.ndarray, classes: list[str], val: float, test: float, seed: int) -> list[str]:
    parts = dict(zip(("train", "val", "test"), stratified_split(labels, val, test, seed), strict=True))
    counts = np.bincount(labels, minlength=len(classes))
    fewest = classes[int(np.argmin(counts))]
    fractions = f"val_fraction={val}, test_fraction={test}"
    problems = [
        f"data.path: the {name} split is empty: every class is too small for {fractions} "
        f"(fewest: class '{fewest}', {counts.min()} images)"
        for name, part in parts.items()
        if len(part) == 0 and (name == "train" or {"val": val, "test": test}[name] > 0)
    ]
    in_train = np.bincount(labels[parts["train"]], minlength=len(classes))
    problems += [
        f"data.path: class '{c}' has {n} image(s), none left for training with {fractions}"
        for c, n, t in zip(classes, counts, in_train, strict=True)
        if n > 0 and t == 0 and len(parts["train"])
    ]
    return problems


def _cifar10(root: str = "data", **_: Any) -> list[str]:
    base = Path(root).expanduser()
    if (base / "cifar-10-batches-bin").is_dir():
        base = base / "cifar-10-batches-bin"
    problems = []
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        file = base / name
        if not file.is_file() or file.stat().st_size % 3073:
            continue  # the builder says so
        labels = np.fromfile(file, dtype=np.uint8).reshape(-1, 3073)[:, 0]
        bad = np.flatnonzero(labels > 9)
        if len(bad):
            problems.append(
                f"data.root: {file} has {len(bad)} label(s) outside 0-9 (first: {int(labels[bad[0]])} "
                f"in record {int(bad[0])}): not a CIFAR-10 binary batch"
            )
    return problems


CHECKS: dict[str, Callable[..., list[str]]] = {"image_folder": _image_folder, "cifar10": _cifar10}
