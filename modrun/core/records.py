"""Reading a run folder's records as input from someone else: every JSON record, JSON-lines file, text record
and path taken from a record goes through here, and a damaged one is one line naming the file (exit 2).

Commands that only list (`runs list`, `runs compare`, a sweep's table) use `try_json` and show the folder with a
warning; commands that need the record (`resume`, `eval`, `soup`, ...) let the RecordError end the command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from modrun.core.errors import UserError

_KINDS = {dict: "object", list: "array", str: "string"}


class RecordError(UserError, ValueError):
    """A record of a run folder that is missing, unreadable, not JSON, or not the JSON type expected.

    A ValueError too, so that callers that treat a damaged optional record as absent keep doing so."""


def _kind(expect: type | tuple[type, ...]) -> str:
    kinds = expect if isinstance(expect, tuple) else (expect,)
    return " or ".join(_KINDS.get(k, k.__name__) for k in kinds)


def _got(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}.get(type(value), "a number")


def read_text(path: Path) -> str:
    """A text record (overrides.txt, config.yaml); unreadable or not UTF-8 is a RecordError."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecordError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise RecordError(f"{path}: is a folder, not a file") from None
    except OSError as e:
        raise RecordError(f"{path}: cannot be read ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise RecordError(f"{path}: not a UTF-8 text file") from None


def read_json(path: Path, expect: type | tuple[type, ...] = dict) -> Any:
    """A JSON record that must hold `expect` (an object by default); anything else is a RecordError."""
    path = Path(path)
    text = read_text(path)
    try:
        value = json.loads(text)
    except ValueError as e:  # JSONDecodeError; also a number too large for Python's int parser
        detail = "empty file" if not text.strip() else str(e).splitlines()[0]
        raise RecordError(f"{path}: not valid JSON ({detail})") from None
    if not isinstance(value, expect):
        raise RecordError(f"{path}: expected a JSON {_kind(expect)}, got {_got(value)}")
    return value


def try_json(path: Path, expect: type | tuple[type, ...] = dict) -> tuple[Any, str | None]:
    """(value, None), or (None, one-line problem) for a damaged record; (None, None) when the file is absent."""
    if not Path(path).exists():
        return None, None
    try:
        return read_json(path, expect), None
    except RecordError as e:
        return None, e.messages[0]


def optional_json(path: Path, expect: type | tuple[type, ...] = dict, default: Any = None) -> Any:
    """A record that may be absent (then `default`); a damaged one is still a RecordError."""
    return read_json(path, expect) if Path(path).exists() else default


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines record; a line cut by a kill, garbage or a non-object is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    found = []
    for line in read_text(path).splitlines():
        try:
            value = json.loads(line) if line.strip() else None
        except ValueError:
            continue
        if isinstance(value, dict):
            found.append(value)
    return found


def read_lines(path: Path) -> list[str]:
    """The non-empty lines of a text record that may be absent (overrides.txt)."""
    path = Path(path)
    return [line for line in read_text(path).splitlines() if line.strip()] if path.exists() else []


def section(record: Any, key: str) -> dict[str, Any]:
    """record[key] when both are objects (summary.json's final and best), else an empty one."""
    value = record.get(key) if isinstance(record, dict) else None
    return value if isinstance(value, dict) else {}


def inside(root: Path, name: Any, record: Path | str) -> Path:
    """`root / name` for a relative path taken from `record` that stays inside `root` (no '..', no absolute path,
    no link out); anything else is a RecordError naming the record."""
    root = Path(root)
    if not isinstance(name, str) or not name.strip() or "\x00" in name:
        raise RecordError(f"{record}: {name!r} is not a folder name inside {root}")
    path = root / name
    try:
        path.resolve().relative_to(root.resolve())
    except (ValueError, OSError):
        raise RecordError(f"{record}: '{name}' points outside {root}") from None
    if Path(name).is_absolute() or ".." in Path(name).parts or path.resolve() == root.resolve():
        raise RecordError(f"{record}: '{name}' points outside {root}")
    return path
