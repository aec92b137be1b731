"""How a run stops early: NaN/inf guard, Ctrl-C and SIGTERM turned into a clean, resumable stop."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf: the run stops, keeping its last good checkpoint."""


class Interrupted(RuntimeError):
    """Ctrl-C or SIGTERM: the loop saved a checkpoint and stopped; `modrun resume` continues."""


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop (data loading, final test, saving, between sweep jobs): a Ctrl-C."""


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While inside, SIGTERM raises `Terminated` (a KeyboardInterrupt) instead of killing the process (exit 143)
    with status.json still `running`; the training loop's StopRequest takes over while it runs."""

    def handle(signum: int, frame: Any) -> None:
        raise Terminated("stopped by SIGTERM")

    try:
        old = signal.signal(signal.SIGTERM, handle)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def check_finite(running: dict[str, torch.Tensor], step: int, epoch: int) -> None:
    if "loss" in running and not torch.isfinite(running["loss"]):
        raise NonFiniteLoss(
            f"loss became non-finite by step {step} (epoch {epoch + 1}); the last checkpoint before it is kept"
        )


class StopRequest:
    """Turns the first Ctrl-C / SIGTERM into a flag the loop checks between steps (a second one kills)."""

    requested: str | None = None

    def __enter__(self) -> StopRequest:
        self._old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = signal.Signals(signum).name
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
