"""Teacher-output cache: the teacher's captured outputs per training sample, computed once, reused after.

Stored as memory-mapped files in the run folder (`teacher_cache/`), so it survives a kill: a resumed run
finds what was computed, and recomputes the rest on demand. The teacher is in eval mode and the data has
no random augmentation, so a sample's teacher outputs never change; which samples are filled is a mask
saved with the checkpoint. On text, sample i is window i of the epoch: with the cache on, the training windows
are drawn once from the seed (epoch 0's draw) and kept, and only their order is reshuffled each epoch. The
dense cache holds every output in fp32; `kd.cache_topk` (topk.py) keeps the teacher's top-k tokens instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from modrun.methods.distill.topk import check_topk

SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.int32: "i32"}


class TeacherCache:
    """Named per-sample arrays (`specs`: name -> (shape of one sample's entry, dtype)) and which samples are in."""

    def __init__(
        self, folder: Path, num_samples: int, specs: dict[str, tuple[torch.Size, torch.dtype]], device: torch.device
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.device = device
        self.filled = torch.zeros(num_samples, dtype=torch.bool, device=device)
        self.complete = False
        self.disk: dict[str, np.memmap] = {}
        self.store: dict[str, torch.Tensor] = {}
        for i, (name, (shape, dtype)) in enumerate(specs.items()):
            path = folder / f"{i}.{SUFFIX[dtype]}"
            np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
            size = np_dtype.itemsize * num_samples * int(np.prod(shape))
            mode = "r+" if path.exists() and path.stat().st_size == size else "w+"
            self.disk[name] = np.memmap(path, dtype=np_dtype, mode=mode, shape=(num_samples, *shape))
            on_disk = torch.from_numpy(self.disk[name])  # shares memory with the mapped file
            # on CPU the mapped file is the store; on an accelerator a device copy serves the reads
            self.store[name] = on_disk if device.type == "cpu" else on_disk.to(device)

    def get(self, idx: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Cached outputs of these samples, or None when any of them is not cached yet."""
        if not self.complete:  # once every sample is in, skip the check (it costs a device sync)
            if not bool(self.filled[idx].all()):
                return None
            self.complete = bool(self.filled.all())
        return {name: store[idx] for name, store in self.store.items()}

    def put(self, idx: torch.Tensor, outputs: dict[str, torch.Tensor]) -> None:
        for name, store in self.store.items():
            value = outputs[name].detach().to(store.dtype)
            store[idx] = value
            if self.device.type != "cpu":
                self.disk[name][idx.cpu().numpy()] = value.cpu().numpy()
        self.filled[idx] = True

    def state_dict(self) -> dict[str, torch.Tensor]:
        for mm in self.disk.values():
            mm.flush()  # the mask saved next to this must not claim rows that are not on disk
        return {"filled": self.filled.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.filled = state["filled"].to(self.device)
        self.complete = bool(self.filled.all())


def check_cache(cfg: DictConfig) -> list[str]:
    """The teacher cache assumes a sample's teacher outputs never change: no random augmentation."""
    errors = check_topk(cfg)
    aug = cfg.data.get("augment") or {}
    if cfg.kd.cache_teacher and (aug.get("crop_padding") or aug.get("hflip")):
        errors.append(
            "kd.cache_teacher=true needs deterministic inputs, but data.augment is random "
            "(set data.augment.crop_padding=0 data.augment.hflip=false, or kd.cache_teacher=false)"
        )
    return errors
