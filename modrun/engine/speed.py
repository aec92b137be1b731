"""Speed options of the training loop: mixed precision, torch.compile and the channels_last memory format.

`trainer.precision` (32 | bf16 | 16-mixed) runs the forward pass and loss under autocast; the weights, the
optimizer and evaluation stay fp32. 16-mixed needs a GradScaler (fp16 gradients underflow), which only CUDA
has here; its state is checkpointed. `trainer.compile` compiles the trained model in place (`Module.compile`,
so state-dict keys keep their plain names) and falls back to eager, with one warning line, when compiling
fails on the first step. `trainer.channels_last` stores 4-d weights and input batches as NHWC, which
convolutions on tensor cores and oneDNN prefer. None changes which random numbers a step draws, so each
keeps exact resume.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from omegaconf import DictConfig
from torch import nn

from modrun.core import checkpoint
from modrun.core.errors import UserError, did_you_mean

log = logging.getLogger("modrun")
PRECISIONS: dict[str, torch.dtype | None] = {"32": None, "bf16": torch.bfloat16, "16-mixed": torch.float16}
T = TypeVar("T")


def device_type(name: str) -> str:
    """The device type a `device=` value runs on ("auto" resolved the way the pipelines resolve it)."""
    if name != "auto":
        return str(name).split(":")[0]
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def precision_problem(precision: Any, device: str) -> str | None:
    """One line saying why `precision` cannot run on a `device` (a type: cpu, cuda, mps), or None."""
    p = str(precision)
    if p not in PRECISIONS:
        return f"trainer.precision={p}: expected 32, bf16 or 16-mixed{did_you_mean(p, PRECISIONS)}"
    if p == "16-mixed" and device != "cuda":
        return (
            f"trainer.precision=16-mixed needs a CUDA GPU (fp16 with a GradScaler) but the run is on {device}; "
            "use trainer.precision=bf16 there"
        )
    return None


def check(cfg: DictConfig) -> list[str]:
    """Validation of the speed keys (trainer.precision; data.prefetch_factor, data.in_memory_mb)."""
    problems = []
    t, d = cfg.get("trainer") or {}, cfg.get("data") or {}
    if str(t.get("precision", "32")) != "32":  # resolving device=auto imports CUDA state: only when it matters
        problem = precision_problem(t.get("precision"), device_type(str(cfg.get("device", "auto"))))
        problems += [problem] if problem else []
    for key, low in (("prefetch_factor", 1), ("in_memory_mb", 0)):
        value = d.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value < low):
            problems.append(f"data.{key}={value}: must be a number >= {low}")
    return problems


class Speed:
    """What the loop needs from the speed options: autocast, a GradScaler, input layout, a compile guard."""

    def __init__(self, trainer: DictConfig, device: torch.device) -> None:
        self.precision = str(trainer.get("precision", "32"))
        problem = precision_problem(self.precision, device.type)
        if problem:  # validation said so already; this catches a resume on another machine
            raise UserError(problem)
        self.dtype, self.device = PRECISIONS[self.precision], device
        self.channels_last = bool(trainer.get("channels_last", False))
        self.compile = bool(trainer.get("compile", False))
        # disabled (32, bf16) it passes through: scale() returns the loss, step() calls optimizer.step()
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "16-mixed")
        self.compiled: nn.Module | None = None
        self.modules: list[nn.Module] = []  # what a failed compile attempt may have changed
        self.unproven = False  # a compiled model whose first step has not run yet

    def prepare(self, model: nn.Module, modules: Iterable[nn.Module]) -> None:
        """Lay out the trained modules and compile the model; call before the optimizer holds the parameters."""
        self.modules = list({id(m): m for m in (model, *modules)}.values())
        if self.channels_last:
            for m in self.modules:
                m.to(memory_format=torch.channels_last)
        if self.compile:
            try:
                model.compile()  # in place: state_dict keys stay plain (torch.compile(model) adds `_orig_mod.`)
            except Exception as e:  # noqa: BLE001 - e.g. a Python version that dynamo does not support
                self._warn(e)
                return
            self.compiled, self.unproven = model, True

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def eager(self) -> contextlib.AbstractContextManager:
        """Evaluation runs eager: compiling eval mode and its batch sizes again would cost more than it saves."""
        if self.compiled is None:
            return contextlib.nullcontext()
        return torch.compiler.set_stance("force_eager")

    def step(self, fn: Callable[..., T], *args: Any) -> T:
        """Run one forward-backward `fn(*args)`. The first call of a compiled model is where compiling happens (forward
        and backward): if it fails, undo what the attempt changed (random state, buffers), warn, and redo it
        eagerly, so the run continues exactly as an eager run would."""
        if not self.unproven:
            return fn(*args)
        rng = checkpoint.rng_state()
        saved = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in self.modules]
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - whatever the compiler raised, eager is the fallback
            self._warn(e)
            self.release()
            checkpoint.set_rng_state(rng)
            for m, state in zip(self.modules, saved, strict=True):
                m.load_state_dict(state)
            return fn(*args)
        finally:
            self.unproven = False

    def release(self) -> None:
        """Back to eager (after training, or when compiling failed): later users of the model see a plain module."""
        if self.compiled is not None:
            self.compiled._compiled_call_impl = None  # what Module.compile() set; None means eager __call__
            self.compiled = None

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict()  # {} unless 16-mixed; floats and ints, fine for weights_only loading

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)

    def _warn(self, e: Exception) -> None:
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        log.warning(f"trainer.compile=true: cannot compile ({type(e).__name__}: {reason}); continuing eager")
