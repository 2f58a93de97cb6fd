"""How policy problems name values: bounded, one line, never an API key.

Shared by load.py (the policy's own entries) and expectations.py (its `tests:`), so
every problem an operator reads is worded the same way.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

_SHOW_LIMIT = 80


def show(value: Any) -> str:
    """A one-line, bounded rendering of a (non-secret) value for messages."""
    text = repr(value)
    return text if len(text) <= _SHOW_LIMIT else text[: _SHOW_LIMIT - 3] + "..."


_TYPE_NAMES = {
    type(None): "nothing",
    dict: "a mapping",
    list: "a list",
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
}


def type_name(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def unknown_keys(where: str, raw: Mapping[Any, Any], known: tuple[str, ...]) -> list[str]:
    problems = []
    for key in raw:
        if key in known:
            continue
        hint = difflib.get_close_matches(str(key), known, n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else f" (expected one of: {', '.join(known)})"
        problems.append(f"{where}unknown key {show(key)}{suggestion}")
    return problems
