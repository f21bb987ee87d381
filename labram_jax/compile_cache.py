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
# key (about 6 of a base fine-tuning run's 16 s to its first step on two cores). The trainer's step is kept whole
# under a key of everything that decides its program, so a warm start skips both.
STEPS = "steps"  # beside JAX's entries
STEPS_MAX_BYTES = 2 * 2 ** 30  # least recently used steps go first beyond this


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
    the jax.stages.Compiled for `devices` (in the order of its device assignment), or of None where the entry
    does not load (one warning). None where nothing is stored. The store is as trusted as JAX's cache folder it
    sits in: an entry is machine code."""
    entry = _entry(key)
    if entry is None or not entry.exists():
        return None

    def load() -> Any:
        from jax.experimental import serialize_executable

        try:
            payload, in_tree, out_tree = pickle.loads(entry.read_bytes())
            step = serialize_executable.deserialize_and_load(payload, in_tree, out_tree, execution_devices=devices)
            os.utime(entry)  # recently used
            return step
        except Exception as error:  # noqa: BLE001 - any damage to the entry means: compile it again
            print(f"warning: the stored train step {entry} did not load ({type(error).__name__}: "
                  f"{str(error)[:200]}); compiling it again", file=sys.stderr)
            return None

    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stored-step")
    future = pool.submit(load)
    pool.shutdown(wait=False)
    return future


def store_step(key: str, compile: Callable[[], Any]) -> Any:
    """compile(), stored under `key` (step_key) for the next run where XLA compiled it here. Written whole (a temporary
    file renamed into place), so two runs storing one step at once leave one of them."""
    from jax.experimental import serialize_executable

    step, fresh = _compile_watched(compile)
    entry = _entry(key)
    if entry is None or not fresh:
        return step
    try:
        blob = pickle.dumps(serialize_executable.serialize(step))
    except (ValueError, NotImplementedError):  # a step XLA cannot serialize (a closed-over constant): not stored
        return step
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        temporary = entry.parent / f".{entry.name}.{os.getpid()}"
        temporary.write_bytes(blob)
        os.replace(temporary, entry)
        _prune(entry.parent)
    except OSError as error:
        print(f"warning: the train step was not stored in {entry.parent} ({error.strerror or error})",
              file=sys.stderr)
    return step


def _compile_watched(compile: Callable[[], Any]) -> tuple[Any, bool]:
    """compile() and whether XLA compiled it in this call. What XLA's CPU backend loaded from a cache entry
    (JAX's, or reused in memory from such a load) serializes without its machine code and then fails to run
    ("Function ... not found"), so only a fresh compilation is stored."""
    import jax

    events: list[str] = []
    listener = lambda event, **_: events.append(event)  # noqa: E731
    jax.monitoring.register_event_listener(listener)
    try:
        step = compile()
    finally:
        jax.monitoring.unregister_event_listener(listener)
    return step, ("/jax/compilation_cache/compile_requests_use_cache" in events
                  and "/jax/compilation_cache/cache_hits" not in events)


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
