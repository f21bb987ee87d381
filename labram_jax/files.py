"""Files a reader never sees half-written: every checkpoint, export, manifest and report of the project is
written through these, into a sibling temporary file that is synced and then renamed over the target."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
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


def file_kind(mode: int) -> str:
    """What a stat mode that is not a regular file's names (for one-line errors)."""
    return ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
            "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else
            "not a regular file")


def not_regular(path: str | os.PathLike, *, folders: bool = False) -> str:
    """What `path` (a link: its target) is when it is not a regular file (nor, with `folders`, a folder): opening a
    FIFO blocks until a writer comes, a device streams without end. "" for what does not exist (its open says)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return ""
    return "" if stat.S_ISREG(mode) or (folders and stat.S_ISDIR(mode)) else file_kind(mode)


def check_regular(path: str | os.PathLike) -> None:
    """A one-line UserError unless `path` is a regular file (not_regular)."""
    if kind := not_regular(path):
        raise UserError(f"{os.fspath(path)}: not a regular file ({kind})")


def _linked(path: str | os.PathLike) -> UserError:
    return UserError(f"{os.fspath(path)}: a symbolic link, not followed (this job writes its own file there): "
                     "remove it")


def read_regular(path: str | os.PathLike, *, follow: bool = True) -> bytes:
    """The bytes of a regular file. Opened without blocking and checked on the open file itself, so a FIFO or
    device put in its place is refused (one-line UserError) rather than waited on; follow=False refuses a
    symbolic link too (a job's own files)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW))
    except OSError as error:
        if error.errno == errno.ELOOP and not follow:
            raise _linked(path) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UserError(f"{os.fspath(path)}: not a regular file ({file_kind(mode)})")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def append_no_follow(path: str | os.PathLike) -> IO[bytes]:
    """`path` opened for appending (created if absent), refusing a symbolic link in its place: a link planted in
    an output folder would have the job write, or lock, wherever it points."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise _linked(path) from None
        raise
    return os.fdopen(fd, "ab")


def read_json_object(path: str | os.PathLike, missing: str, what: str) -> dict[str, Any]:
    """The JSON object in `path`, or a one-line UserError: `missing` when there is no such file, "unreadable" with
    the reason when it cannot be read or parsed, "not `what`" when it holds something other than an object."""
    path = Path(path)
    try:
        value = json.loads(read_regular(path))
    except FileNotFoundError:
        raise UserError(missing) from None
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: unreadable: {one_line(error)}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: not {what}")
    return value
