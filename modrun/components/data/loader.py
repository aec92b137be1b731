"""File-backed splits: read through one DataLoader per split that lives across epochs, or decoded into
memory once when they fit `data.in_memory_mb`.

The order of a pass never comes from the DataLoader: `batches` decides the index lists, as a function of
(seed, epoch) and of the batches a resumed run skips, and hands them to the loader's sampler before each
pass. So the worker processes can persist between epochs (their start-up is paid once) while every pass
reads exactly the batches an in-memory split would yield, in the same order.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Sampler

if TYPE_CHECKING:  # base.batches() imports this module for file-backed splits
    from modrun.components.data.base import Data, Split

log = logging.getLogger("modrun")


class PassBatches(Sampler[list[int]]):
    """The index lists of the pass about to start; set before each pass."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def loader_for(split: Split, num_workers: int, pin_memory: bool, prefetch_factor: int) -> DataLoader:
    """The split's DataLoader for these settings, made once and kept on the split."""
    key = (num_workers, pin_memory, prefetch_factor)
    if key not in split.loaders:
        split.loaders[key] = DataLoader(
            split.dataset,
            batch_sampler=PassBatches(),
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            # its own generator: without one, each new iterator draws the workers' base seed from the global RNG,
            # and a resumed run would draw once more than an uninterrupted one
            generator=torch.Generator().manual_seed(0),
        )
    return split.loaders[key]


def read_batches(
    split: Split,
    chunks: list[torch.Tensor],
    num_workers: int,
    device: torch.device | None,
    prefetch_factor: int = 2,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(images, labels, indices) of the given index chunks, read by the split's persistent loader."""
    pin = device is not None and device.type == "cuda"  # page-locked host memory: asynchronous copies to the GPU
    loader = loader_for(split, num_workers, pin, prefetch_factor)
    loader.batch_sampler.batches = [c.tolist() for c in chunks]
    for (x, y), idx in zip(loader, chunks, strict=True):
        if device is not None:
            x, y, idx = (t.to(device, non_blocking=True) for t in (x, y, idx))
        yield x, y, idx


def load_in_memory(data: Data, budget_mb: float, num_workers: int = 0) -> Data:
    """Decode file-backed splits into tensors when all of them together fit `budget_mb` (0: never).

    In memory they take the fast path (indexing on the device, no workers); the batches are the same."""
    splits = list({id(s): s for s in (data.train, data.val, data.test) if s.x is None and s.dataset}.values())
    if not splits or budget_mb <= 0:
        return data
    first = next(s.dataset[0][0] for s in splits if len(s))
    size_mb = first.numel() * first.element_size() * sum(len(s) for s in splits) / 2**20
    if size_mb > budget_mb:
        log.info(f"data: {size_mb:.0f} MB decoded exceeds data.in_memory_mb={budget_mb:g}; reading from disk")
        return data
    for split in splits:
        chunks = list(torch.arange(len(split)).split(256)) if len(split) else []
        xs = [x for x, _, _ in read_batches(split, chunks, num_workers, None)]
        split.x = torch.cat(xs) if xs else torch.empty((0, *first.shape), dtype=first.dtype)
        split.loaders.clear()  # the decoding workers are no longer needed
    log.info(f"data: {sum(len(s) for s in splits)} images ({size_mb:.1f} MB) decoded into memory")
    return data
