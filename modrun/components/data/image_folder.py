"""Images on disk: PATH/<class>/*.png, or PATH/train/<class>/... with val/ (and test/) beside it.

Files are decoded lazily by DataLoader workers, so folders larger than memory work; folders that fit
`data.in_memory_mb` are decoded once at the start and then batched from memory (data/loader.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from modrun.components.data.base import Data, Split, check_fractions
from modrun.components.data.builtin import stratified_split
from modrun.core.errors import UserError

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class ImageFiles(Dataset):
    def __init__(self, files: list[Path], labels: list[int], image_size: int, channels: int) -> None:
        self.files, self.labels = files, labels
        self.image_size, self.mode = image_size, {1: "L", 3: "RGB"}[channels]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image  # Pillow comes with the vision extra; only image folders need it

        with Image.open(self.files[i]) as img:
            img = img.convert(self.mode).resize((self.image_size, self.image_size), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.uint8).reshape(self.image_size, self.image_size, -1)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1), self.labels[i]


def _scan(folder: Path, classes: list[str] | None = None) -> tuple[list[Path], list[int], list[str]]:
    classes = classes or sorted(d.name for d in folder.iterdir() if d.is_dir())
    files, labels = [], []
    for label, name in enumerate(classes):
        sub = folder / name
        found = sorted(p for p in sub.rglob("*") if p.suffix.lower() in EXTENSIONS) if sub.is_dir() else []
        files += found
        labels += [label] * len(found)
    return files, labels, classes


def _split(files: list[Path], labels: list[int], size: int, channels: int) -> Split:
    return Split(y=torch.tensor(labels, dtype=torch.long), dataset=ImageFiles(files, labels, size, channels))


def image_folder(
    path: str,
    image_size: int = 32,
    channels: int = 3,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    split_seed: int = 0,
) -> Data:
    """One folder per class; split stratified by fraction unless train/ and val/ folders exist."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"data.path: '{path}' is not a directory")
    if channels not in (1, 3):
        raise UserError(f"data.channels must be 1 or 3 for image_folder, got {channels}")
    if (root / "train").is_dir():
        files, labels, classes = _scan(root / "train")
        train = _split(files, labels, image_size, channels)
        val_dir = next((root / d for d in ("val", "valid", "validation") if (root / d).is_dir()), None)
        if val_dir is None:
            raise UserError(f"data.path: '{path}' has train/ but no val/ folder")
        val = _split(*_scan(val_dir, classes)[:2], image_size, channels)
        test = _split(*_scan(root / "test", classes)[:2], image_size, channels) if (root / "test").is_dir() else val
    else:
        files, labels, classes = _scan(root)
        check_fractions(len(files), val_fraction, test_fraction)
        tr, va, te = stratified_split(np.array(labels), val_fraction, test_fraction, split_seed)
        train, val, test = (
            _split([files[i] for i in ix], [labels[i] for i in ix], image_size, channels) for ix in (tr, va, te)
        )
    if len(classes) < 2 or len(train) == 0:
        raise UserError(f"data.path: '{path}' needs at least 2 class folders with images ({EXTENSIONS})")
    # statistics from up to 512 training images: enough for normalisation, cheap on large folders
    sample = torch.stack([train.dataset[i][0] for i in range(0, len(train), max(1, len(train) // 512))])
    xf = sample.float() / 255
    mean, std = xf.mean(dim=(0, 2, 3)).tolist(), xf.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist()
    return Data(train, val, test, channels, image_size, len(classes), mean, std)
