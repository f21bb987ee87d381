"""Files a reader never sees half-written: every checkpoint, export, manifest and report of the project is
written through these, into a sibling temporary file that is synced and then renamed over the target."""
from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import IO, Any, Callable

from labram_jax.errors import UserError, one_line


def replace_atomically(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Write a file through `write` into a sibling temporary file, synced, then renamed over `path`: a reader never
    sees half a file, and an interrupted write leaves the old one (and no temporary file)."""
    tmp = f"{os.fspath(path)}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1, **dumps: Any) -> None:
    """`obj` as JSON text ending in a newline, replacing `path` atomically; `dumps` go to json.dumps. The text is
    formed before the file is opened, so an object that is not JSON leaves `path` as it was."""
    text = (json.dumps(obj, indent=indent, **dumps) + "\n").encode()
    replace_atomically(path, lambda f: f.write(text))


def read_json_object(path: str | os.PathLike, missing: str, what: str) -> dict[str, Any]:
    """The JSON object in `path`, or a one-line UserError: `missing` when there is no such file, "unreadable" with
    the reason when it cannot be read or parsed, "not `what`" when it holds something other than an object."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(missing) from None
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: unreadable: {one_line(error)}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: not {what}")
    return value
