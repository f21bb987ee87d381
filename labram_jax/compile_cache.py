"""A persistent XLA compilation cache for every command that trains or runs a model: a rerun with the same
programs (a seed sweep, a resume after preemption, the user's tenth run of the day) loads them instead of
compiling them again.

Where: `$LABRAM_JAX_CACHE` (`off` disables it), else `$XDG_CACHE_HOME/labram-jax/xla`, else
`~/.cache/labram-jax/xla`; a cache the user set through JAX's own `JAX_COMPILATION_CACHE_DIR` wins. Entries are
keyed by the program (JAX hashes the compiled module, its options and the backend), so a changed config
compiles anew. Every program is kept, however small or quick to compile.

Safe: the cache is size-bounded (least recently used entries go first), which also makes JAX take a file lock
around every read and write, so two processes writing one entry do not interleave; an entry that does not load
(cut short, corrupt) is compiled again with JAX's one warning; a folder that cannot be written, or a disk with
almost no room, leaves the run without a cache and one warning.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

ENV = "LABRAM_JAX_CACHE"
MAX_BYTES = 8 * 2 ** 30  # the folder's bound; a LaBraM-Huge pod step is about 100 MB of executable
MIN_FREE_BYTES = 256 * 2 ** 20  # less room than this: no cache (JAX would warn at every entry it cannot write)


def folder() -> Path | None:
    """The cache folder the environment asks for, None for `LABRAM_JAX_CACHE=off`."""
    setting = os.environ.get(ENV, "").strip()
    if setting.lower() == "off":
        return None
    if setting:
        return Path(setting).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "labram-jax" / "xla"


def enable() -> Path | None:
    """Turn the cache on for this process (before its first compilation); returns the folder in use, or None."""
    import jax

    if jax.config.jax_compilation_cache_dir:  # the user's JAX_COMPILATION_CACHE_DIR
        where = Path(jax.config.jax_compilation_cache_dir)
    else:
        where = folder()
        if where is None:
            return None
        try:
            where.mkdir(parents=True, exist_ok=True)
            probe = where / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
            free = shutil.disk_usage(where).free
        except OSError as error:
            print(f"warning: no compilation cache: {where} is not writable ({error.strerror or error}); set "
                  f"{ENV}=DIR to move it", file=sys.stderr)
            return None
        if free < MIN_FREE_BYTES:
            print(f"warning: no compilation cache: {where} has {free / 2 ** 20:.0f} MiB free; set {ENV}=DIR to "
                  "move it", file=sys.stderr)
            return None
        jax.config.update("jax_compilation_cache_dir", str(where))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if jax.config.jax_compilation_cache_max_size == -1:  # unbounded also means unlocked: bound it
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return where
