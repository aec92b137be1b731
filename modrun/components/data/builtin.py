"""Datasets that live in memory as tensors: digits (bundled), synthetic, CIFAR-10 (binary release)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from modrun.components.data.base import Data, Split, channel_stats, check_fractions
from modrun.core.errors import UserError


def stratified_split(
    y: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of train/val/test with every class in the same proportion in each split (sorted)."""
    rng = np.random.RandomState(seed)
    parts: tuple[list, list, list] = ([], [], [])
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        n_test, n_val = int(round(len(idx) * test_fraction)), int(round(len(idx) * val_fraction))
        parts[2].append(idx[:n_test])
        parts[1].append(idx[n_test : n_test + n_val])
        parts[0].append(idx[n_test + n_val :])
    return tuple(np.sort(np.concatenate(p)) for p in parts)


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits file, read directly (importing sklearn costs a second of start-up)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is not None and path.is_file():
        raw = np.loadtxt(path, delimiter=",", dtype=np.float32)
        return raw[:, :-1].reshape(-1, 8, 8), raw[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # the file moved in some release: ask sklearn itself

    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


def _resize(x: torch.Tensor, image_size: int) -> torch.Tensor:
    if x.shape[-1] == image_size and x.shape[-2] == image_size:
        return x
    return F.interpolate(x.float(), size=(image_size, image_size), mode="bilinear", align_corners=False)


def tensor_data(x: torch.Tensor, y: torch.Tensor, splits: tuple, num_classes: int, image_size: int) -> Data:
    """Bundle in-memory images (float in [0, 1] or uint8) cut into train/val/test by index arrays."""
    parts = [
        Split(x=x[torch.as_tensor(i, dtype=torch.long)], y=y[torch.as_tensor(i, dtype=torch.long)]) for i in splits
    ]
    mean, std = channel_stats(parts[0].x)
    return Data(*parts, channels=x.shape[1], image_size=image_size, num_classes=num_classes, mean=mean, std=std)


def digits(image_size: int = 8, val_fraction: float = 0.1, test_fraction: float = 0.2, split_seed: int = 0) -> Data:
    """The 1797 8x8 digit images bundled with scikit-learn, stratified train/val/test split."""
    images, target = _load_digits()
    check_fractions(len(target), val_fraction, test_fraction)
    x = torch.from_numpy(images).unsqueeze(1) / 16.0
    y = torch.from_numpy(target)
    splits = stratified_split(target, val_fraction, test_fraction, split_seed)
    return tensor_data(_resize(x, image_size), y, splits, 10, image_size)


def synthetic(
    size: int = 2048,
    val_size: int = 256,
    test_size: int = 256,
    image_size: int = 32,
    channels: int = 3,
    num_classes: int = 10,
    noise: float = 0.35,
    data_seed: int = 0,
) -> Data:
    """Learnable random images: a smooth prototype per class plus uniform noise."""
    if min(size, num_classes, channels, image_size) < 1 or min(val_size, test_size) < 0:
        raise UserError("data: size, num_classes, channels and image_size must be positive")
    gen = torch.Generator().manual_seed(data_seed)
    n = size + val_size + test_size
    protos = F.interpolate(
        torch.rand(num_classes, channels, 4, 4, generator=gen),
        size=(image_size, image_size),
        mode="bilinear",
        align_corners=False,
    )
    y = torch.randint(0, num_classes, (n,), generator=gen)
    x = (1 - noise) * protos[y] + noise * torch.rand(n, channels, image_size, image_size, generator=gen)
    idx = np.arange(n)
    return tensor_data(x, y, (idx[:size], idx[size : size + val_size], idx[size + val_size :]), num_classes, image_size)


def _read_cifar_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % 3073:
        raise UserError(f"data.root: {path} is not a CIFAR-10 binary batch (size not a multiple of 3073 bytes)")
    raw = raw.reshape(-1, 3073)
    return raw[:, 1:].reshape(-1, 3, 32, 32), raw[:, 0].astype(np.int64)


def cifar10(root: str = "data", image_size: int = 32, val_size: int = 5000, split_seed: int = 0) -> Data:
    """CIFAR-10 from the binary release: ROOT/cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin.

    Read with numpy (no pickle, so loading never runs code); kept as uint8 (150 MB) and scaled per batch.
    """
    base = Path(root).expanduser()
    if (base / "cifar-10-batches-bin").is_dir():
        base = base / "cifar-10-batches-bin"
    files = [base / f"data_batch_{i}.bin" for i in range(1, 6)] + [base / "test_batch.bin"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(
            f"data.root: no CIFAR-10 binary batches in {base} (missing {', '.join(missing)}); "
            "download cifar-10-binary.tar.gz and extract it there"
        )
    xs, ys = zip(*(_read_cifar_bin(f) for f in files[:5]), strict=True)
    x_train, y_train = np.concatenate(xs), np.concatenate(ys)
    x_test, y_test = _read_cifar_bin(files[5])
    if not 0 <= val_size < len(y_train):
        raise UserError(f"data.val_size={val_size} must be in [0, {len(y_train)})")
    x = torch.from_numpy(np.concatenate([x_train, x_test]))
    y = torch.from_numpy(np.concatenate([y_train, y_test]))
    frac = val_size / len(y_train)
    train, val, _ = stratified_split(y_train, frac, 0.0, split_seed)
    test = np.arange(len(y_train), len(y))
    if image_size != 32:
        x = (_resize(x, image_size) / 255).clamp_(0, 1)
    return tensor_data(x, y, (train, val, test), 10, image_size)
