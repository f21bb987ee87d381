"""The one error type for bad input (a config field, a file, a key, the shape of the user's data), and the two
ways the project words its messages: on one line, and as a report of mismatched keys.

Commands print a UserError as one line and exit with status 2; every other exception is a bug and keeps its
traceback. It is a ValueError, so code that caught the library's ValueErrors before still catches it.
"""
from __future__ import annotations

from typing import Any, Mapping


class UserError(ValueError):
    """Bad input from the user, named in one line (the file, field or key, and what is wrong with it)."""


def one_line(error: BaseException | str, limit: int | None = None) -> str:
    """The message with its white space folded (a library's multi-line message, a path with a newline), cut to
    `limit` characters; an exception without a message gives its type's name."""
    text = " ".join(str(error).split())
    if not text and isinstance(error, BaseException):
        text = type(error).__name__
    return text if limit is None else text[:limit]


def _names(keys: list[str], limit: int | None) -> str:
    if limit is None or len(keys) <= limit:
        return ", ".join(keys)
    return ", ".join(keys[:limit]) + f" and {len(keys) - limit} more"


def key_mismatch(have: Mapping[str, Any], want: Mapping[str, Any], *, allow_missing: tuple[str, ...] = (),
                 wrong: str = "wrong shape", limit: int | None = None) -> str:
    """What `have` (key -> shape, or any description) lacks, has in excess and has otherwise than `want`, as
    "missing: ...; unexpected: ...; wrong shape: k (have) (expected want)", naming only the non-empty parts in
    the order of `want` and `have`; "" when they match. Keys starting with `allow_missing` may be absent, and
    `limit` caps the keys named per part."""
    parts = (("missing", [k for k in want if k not in have and not k.startswith(allow_missing)]),
             ("unexpected", [k for k in have if k not in want]),
             (wrong, [f"{k} {have[k]} (expected {want[k]})" for k in want if k in have and have[k] != want[k]]))
    return "; ".join(f"{label}: {_names(keys, limit)}" for label, keys in parts if keys)
