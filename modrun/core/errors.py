"""Errors that mean "bad input": the CLI prints them as one line and exits with code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input (config, override, path). Carries one or more one-line messages."""

    def __init__(self, *messages: str) -> None:
        self.messages = [m for m in messages if m]
        super().__init__("\n".join(self.messages))


class UnsafeInput(UserError):
    """A config, override or record that would run code or write outside the run folder: refused, never worked
    around (exit code 2 like any bad input)."""


class WriteFailed(Exception):
    """A genuine I/O failure (a full disk) while writing a result: one line and exit code 1, nothing half-written."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The valid choice closest to `name`, or None when nothing is close."""
    choices = list(choices)
    prefixed = [c for c in choices if c.startswith(name) and name]
    if len(prefixed) == 1:
        return prefixed[0]
    match = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    if match:
        return match[0]
    # a dotted key whose last part matches a valid key's last part ("optim.lrr" -> "optim.lr")
    tail = name.rsplit(".", 1)[-1]
    tails = {c.rsplit(".", 1)[-1]: c for c in choices}
    match = difflib.get_close_matches(tail, list(tails), n=1, cutoff=0.6)
    return tails[match[0]] if match else None


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' — did you mean X?' or a short list of valid choices when nothing is close."""
    choices = sorted(set(choices))
    best = closest(name, choices)
    if best is not None:
        return f" — did you mean {best}?"
    if not choices:
        return ""
    shown = ", ".join(choices[:8]) + (", ..." if len(choices) > 8 else "")
    return f" (valid: {shown})"
