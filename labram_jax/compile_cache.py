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

import concurrent.futures
import hashlib
import importlib.metadata
import inspect
import io
import logging
import marshal
import json
import os
import pickle
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

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


# -- compiled train steps ------------------------------------------------------------------------------------------
# JAX's cache is keyed by the lowered program, so a warm start still traces and lowers the train step to find its
# key (about 6 of a base fine-tuning run's 16 s to its first step on two cores). The trainer's step is kept under a
# key of everything that decides its program, its executable being JAX's entry of it, so a warm start skips both.
# What is read here from JAX's internals (its compiler's log of each lookup's key, its cache's entry format) is of
# the pinned jax; tests/test_compile_cache.py fails if either moves.
STEPS = "steps"  # beside JAX's entries
STEPS_MAX_BYTES = 256 * 2 ** 20  # least recently used steps go first beyond this


def _sources() -> str:
    """A hash of labram_jax's code: the step's program is whatever that code traces."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def code_of(*functions: Callable) -> dict[str, str]:
    """A hash of the file that defines each function, by its name: code from outside labram_jax that a program
    runs (a stage registered by a user's script); the function's own code where it has no file (a script read
    from stdin)."""
    def digest(fn: Callable) -> str:
        try:
            return hashlib.sha256(Path(inspect.getsourcefile(fn) or "").read_bytes()).hexdigest()
        except (TypeError, OSError):
            code = getattr(fn, "__code__", None)
            return hashlib.sha256(marshal.dumps(code) if code else repr(fn).encode()).hexdigest()

    return {f"{fn.__module__}.{getattr(fn, '__qualname__', type(fn).__name__)}": digest(fn) for fn in functions}


def _environment() -> dict[str, Any]:
    """What decides a program besides the caller's parts: the code, the libraries, JAX's settings, XLA's flags."""
    import jax

    versions = {name: importlib.metadata.version(name) for name in ("jax", "jaxlib", "flax", "optax", "numpy")}
    settings = {name: repr(value) for name, value in sorted(jax.config.values.items())}
    return {"sources": _sources(), "versions": versions, "python": sys.version, "jax_config": settings,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "backend": jax.default_backend(),
            "devices": [(d.id, d.device_kind, d.process_index) for d in jax.devices()]}


def step_key(parts: dict[str, Any]) -> str:
    """The store's key of a train step described by `parts` (JSON-able: its config, argument shapes, dtypes and
    shardings, mesh) in this environment."""
    blob = json.dumps({"parts": parts, "environment": _environment()}, sort_keys=True, default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()


def _entry(key: str) -> Path | None:
    """Where the step of `key` (step_key) is stored; None where nothing is (no persistent cache, or several
    processes: each would need its own entry, and JAX's cache still serves them)."""
    import jax

    if not jax.config.jax_compilation_cache_dir or jax.process_count() > 1:
        return None
    return Path(jax.config.jax_compilation_cache_dir) / STEPS / f"{key}.step"


def stored_step(key: str, devices: list) -> concurrent.futures.Future | None:
    """The train step an earlier run stored under `key` (step_key), loading in a thread (XLA rebuilds it from its
    serialized form outside the GIL, seconds for a base model, while the caller builds the state): a Future of
    the jax.stages.Compiled for `devices` (in the order of its device assignment), or of None where it does not
    load. None where nothing is stored. The store is as trusted as JAX's cache folder it sits in: an entry is
    machine code."""
    entry = _entry(key)
    if entry is None or not entry.exists():
        return None

    def load() -> Any:
        try:
            record = entry.read_bytes()
            os.utime(entry)  # recently used
            return _loads_step(record, devices)
        except _EntryGone:  # JAX's entry was evicted or is damaged: JAX's own read then compiles it (and warns)
            return None
        except Exception as error:  # noqa: BLE001 - any damage to our record means: compile it again
            print(f"warning: the stored train step {entry} did not load ({type(error).__name__}: "
                  f"{str(error)[:200]}); compiling it again", file=sys.stderr)
            return None

    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stored-step")
    future = pool.submit(load)
    pool.shutdown(wait=False)
    return future


def store_step(key: str, compile: Callable[[], Any]) -> Any:
    """compile(), stored under `key` (step_key) for the next run: its executable as a reference to the JAX cache
    entry that compile() wrote or read (XLA's CPU backend serializes an executable it loaded from an entry without
    its machine code, so only JAX's own entry holds it), with what JAX needs around it (trees, shardings, avals).
    Written whole (a temporary file renamed into place), so two runs storing one step at once leave one of them."""
    step, jax_key = _compile_keyed(compile)
    entry = _entry(key)
    if entry is None or jax_key is None:
        return step
    try:
        record = _dumps_step(step, jax_key)
    except (ValueError, NotImplementedError):  # a step XLA cannot serialize (a closed-over constant): not stored
        return step
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        temporary = entry.parent / f".{entry.name}.{os.getpid()}"
        temporary.write_bytes(record)
        os.replace(temporary, entry)
        _prune(entry.parent)
    except OSError as error:
        print(f"warning: the train step was not stored in {entry.parent} ({error.strerror or error})",
              file=sys.stderr)
    return step


class _EntryGone(Exception):
    """The JAX cache entry a stored step refers to is not there, or does not load."""


# JAX logs the persistent cache's key of every program it looks up, hit or miss, at debug level.
_LOOKUPS = ("Persistent compilation cache hit for", "PERSISTENT COMPILATION CACHE MISS for")


class _KeyOfLookup(logging.Filter):
    """Records the key of each persistent cache lookup that JAX logs while attached to its compiler's logger, and
    lets through only what that logger showed before (so attaching it shows no debug lines)."""

    def __init__(self, shown_from: int):
        super().__init__()
        self.shown_from, self.keys = shown_from, []

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(_LOOKUPS) and len(record.args or ()) == 2:
            self.keys.append(record.args[1])
        return record.levelno >= self.shown_from


def _compile_keyed(compile: Callable[[], Any]) -> tuple[Any, str | None]:
    """compile() and the key of the JAX cache entry it wrote or read (None without a persistent cache)."""
    logger = logging.getLogger("jax._src.compiler")
    watch = _KeyOfLookup(logger.getEffectiveLevel())
    level = logger.level
    logger.addFilter(watch)
    logger.setLevel(logging.DEBUG)
    try:
        step = compile()
    finally:
        logger.setLevel(level)
        logger.removeFilter(watch)
    return step, (watch.keys[-1] if watch.keys else None)


def _step_pickling() -> tuple[type, type]:
    """jax.experimental.serialize_executable's pickler and unpickler of a compiled step (devices and client by
    reference), with the executable itself as the key of its JAX cache entry, read from there as JAX does on a hit."""
    from jax._src import compilation_cache
    from jax._src.lib import xla_client as xc
    from jax.experimental import serialize_executable

    class Pickler(serialize_executable._JaxPjrtPickler):
        def __init__(self, file: io.BytesIO, jax_key: str):
            super().__init__(file)
            self.jax_key = jax_key

        def persistent_id(self, obj: Any) -> Any:
            return ("jax-entry", self.jax_key) if isinstance(obj, xc.LoadedExecutable) else super().persistent_id(obj)

    class Unpickler(serialize_executable._JaxPjrtUnpickler):
        def persistent_load(self, pid: Any) -> Any:
            if pid[0] != "jax-entry":
                return super().persistent_load(pid)
            cache = compilation_cache._get_cache(self.backend)
            try:
                blob = cache.get(pid[1]) if cache is not None else None
                if blob is not None:
                    executable, _ = compilation_cache.extract_executable_and_time(
                        compilation_cache.decompress_executable(blob))
                    return self.backend.deserialize_executable(executable, executable_devices=self.execution_devices)
            except Exception as error:  # noqa: BLE001 - a damaged entry: JAX warns when its compile reads it
                raise _EntryGone(pid[1]) from error
            raise _EntryGone(pid[1])

    return Pickler, Unpickler


def _dumps_step(step: Any, jax_key: str) -> bytes:
    """A compiled step as serialize_executable.serialize writes it, its executable referring to `jax_key`."""
    import jax

    unloaded = getattr(step._executable, "_unloaded_executable", None)
    if unloaded is None or step._params.const_args:
        raise ValueError("this compiled step does not serialize")
    args_info, in_tree = jax.tree_util.tree_flatten(step.args_info)
    with io.BytesIO() as file:
        _step_pickling()[0](file, jax_key).dump((unloaded, args_info, step._no_kwargs))
        return pickle.dumps((file.getvalue(), in_tree, step.out_tree))


def _loads_step(record: bytes, devices: list) -> Any:
    """What _dumps_step wrote, as serialize_executable.deserialize_and_load loads it, on `devices`."""
    import jax

    payload, in_tree, out_tree = pickle.loads(record)
    unloaded, args_info, no_kwargs = _step_pickling()[1](io.BytesIO(payload), devices[0].client, devices).load()
    return jax.stages.Compiled(unloaded.load(), [], in_tree.unflatten(args_info), out_tree, no_kwargs=no_kwargs)


def _prune(store: Path) -> None:
    """Remove the least recently used entries while the store holds more than STEPS_MAX_BYTES, and what a run
    killed while writing left behind a day ago."""
    for left in store.glob(".*.step.*"):
        if time.time() - left.stat().st_mtime > 86400:
            left.unlink(missing_ok=True)
    entries = sorted(store.glob("*.step"), key=lambda p: p.stat().st_mtime, reverse=True)
    total = 0
    for path in entries:
        total += path.stat().st_size
        if total > STEPS_MAX_BYTES:
            path.unlink(missing_ok=True)
