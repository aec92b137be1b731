"""The data bundle every dataset builder returns, and how batches are drawn from it.

Small datasets are tensors held on the device and batched by index (no DataLoader, no workers); datasets
too large for memory (more than `data.in_memory_mb` decoded) are map-style `Dataset`s read through a
DataLoader that lives across epochs (data/loader.py). Either way the order of an epoch is a pure function
of (seed, epoch), so a resumed run can skip exactly the batches it already consumed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from modrun.components.data.loader import read_batches
from modrun.components.data.tasks import CLASSIFICATION, Task
from modrun.core.collectives import rank, shard_order, world_size
from modrun.core.errors import UserError


@dataclass
class Split:
    """One split: `x` in memory (float in [0, 1] or uint8) or a `dataset` yielding (uint8/float image, label)."""

    y: torch.Tensor
    x: torch.Tensor | None = None
    dataset: Dataset | None = None
    loaders: dict = field(default_factory=dict, repr=False, compare=False)  # kept across epochs (data/loader.py)

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Data:
    train: Split
    val: Split
    test: Split
    channels: int
    image_size: int
    num_classes: int
    mean: list[float] = field(default_factory=list)  # per channel, of the train split, in [0, 1] units
    std: list[float] = field(default_factory=list)
    task: Task = CLASSIFICATION
    vocab_size: int = 0  # language modeling: tokens (num_classes is the same number)
    block_size: int = 0  # language modeling: tokens per window
    tokenizer: str = "byte-level"  # language modeling: what made the tokens (a tokenizer folder), for messages

    def to(self, device: torch.device) -> Data:
        """Move in-memory splits to the device once, so that batching is indexing on the device."""
        for split in (self.train, self.val, self.test):
            if hasattr(split, "tokens"):  # a token stream (data/text.py)
                split.to(device)
            elif split.x is not None:
                split.x, split.y = split.x.to(device), split.y.to(device)
        return self

    def example(self, batch: int = 1, device: torch.device | str = "cpu") -> torch.Tensor:
        """A model input of `batch` samples: C x H x W images, or windows of block_size tokens."""
        return example_input(self.task.name, batch, device, self.channels, self.image_size, self.block_size)


def example_input(
    task: str, batch: int, device: torch.device | str, channels: int, image_size: int, block_size: int
) -> torch.Tensor:
    """Zeros shaped as a model's input (also from a config alone, on the meta device, before data is loaded)."""
    if task == "language_modeling":
        return torch.zeros(batch, block_size, dtype=torch.long, device=device)
    return torch.zeros(batch, channels, image_size, image_size, device=device)


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of images in [0, 1] (uint8 is scaled)."""
    xf = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    return xf.mean(dim=(0, 2, 3)).tolist(), xf.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist()


def check_fractions(n: int, val_fraction: float, test_fraction: float) -> None:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UserError(
            f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must be in [0, 1)"
            " and sum to less than 1"
        )
    if n * (1 - val_fraction - test_fraction) < 2:
        raise UserError(f"data: only {n} samples, too few to split into train/val/test")


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The sample order of one epoch: the same for the same (seed, epoch), whatever happened before."""
    if not shuffle:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen)


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


def batches(
    split: Split,
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = False,
    drop_last: bool = False,
    start: int = 0,
    num_workers: int = 0,
    device: torch.device | None = None,
    shard: str | None = None,
    prefetch_factor: int = 2,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(images, labels, sample indices) of one epoch, skipping the first `start` batches (consumed before a
    resume). The indices let per-sample state (teacher-output caches, contrastive memories) follow samples.

    `shard` ("train" or "eval") takes this process's share in a data-parallel run: training pads the order to
    the same length on every rank (DistributedSampler), evaluation splits it without repeats."""
    order = epoch_order(len(split), seed, epoch, shuffle)
    if shard:  # a data-parallel run: this process's share of the epoch
        order = shard_order(len(split), seed, epoch, shuffle) if shard == "train" else order[rank() :: world_size()]
    chunks = list(order.split(batch_size))
    if drop_last and chunks and len(chunks[-1]) < batch_size:
        chunks.pop()
    chunks = chunks[start:]
    if hasattr(split, "tokens"):  # windows of a token stream: (inputs, next tokens)
        for idx in chunks:
            yield (*split.window(idx, seed, epoch), idx)
        return
    if split.x is not None:
        for idx in chunks:
            idx = idx.to(split.x.device)
            yield split.x[idx], split.y[idx], idx
        return

    yield from read_batches(split, chunks, num_workers, device, prefetch_factor)


class Preprocess:
    """Turns a raw batch into the model's input on the device: scale, optional augmentation, normalize.

    Augmentation (random crop with padding, horizontal flip) is batched on the device and drawn from a
    generator seeded by (seed, step), so it does not depend on workers or on where a run was resumed.
    """

    def __init__(self, data: Data, device: torch.device, crop_padding: int = 0, hflip: bool = False) -> None:
        self.tokens = data.task.name == "language_modeling"  # token ids pass through as they are
        self.mean = torch.tensor(data.mean or [0.0] * data.channels, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(data.std or [1.0] * data.channels, device=device).view(1, -1, 1, 1)
        self.crop_padding, self.hflip = crop_padding, hflip
        self.device = device

    @property
    def random(self) -> bool:
        return self.crop_padding > 0 or self.hflip

    def __call__(self, x: torch.Tensor, augment_seed: int | None = None) -> torch.Tensor:
        if self.tokens:
            return x
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        if augment_seed is not None and self.random:
            gen = torch.Generator(device=x.device).manual_seed(augment_seed)
            x = self._augment(x, gen)
        return (x - self.mean) / self.std

    def _augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b, _, h, w = x.shape
        if self.crop_padding > 0:
            p = self.crop_padding
            padded = torch.nn.functional.pad(x, (p, p, p, p), mode="reflect" if p < min(h, w) else "constant")
            oy = torch.randint(0, 2 * p + 1, (b,), generator=gen, device=x.device)
            ox = torch.randint(0, 2 * p + 1, (b,), generator=gen, device=x.device)
            rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
            cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
            chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
            x = padded[torch.arange(b, device=x.device)[:, None, None, None], chans, rows, cols]
        if self.hflip:
            flip = torch.rand(b, generator=gen, device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x
