"""Orbax checkpoints of a training run: the train state, the data iterator's position and the run's metadata.

The state is saved as a flat {path: array} dict, so it restores onto any mesh or device count: the restore target
carries the new run's shardings. Orbax writes each step into a temporary folder and renames it when complete, so
a save cut in the middle leaves the previous checkpoint usable; such leftovers are removed at the next start. A
step that is damaged all the same (storage without atomic renames, files deleted by hand) is skipped with a
warning, and the one before it restored; only proven damage counts, a file of the step that is missing or does
not parse, so that a transient read error or an out-of-memory error is raised rather than discarding progress.
Process 0 decides which step that is and tells the others. Each process's grain iterator state is its own JSON
file beside the step, since processes read different slices.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from labram_jax.errors import UserError, key_mismatch, one_line
from labram_jax.files import write_json


class DamagedCheckpoint(RuntimeError):
    """A checkpoint step that lacks a file a complete step holds, or holds one that does not parse."""


class DiskFull(OSError):
    """A checkpoint save that ran out of disk space."""


def _out_of_space(error: BaseException | None) -> bool:
    # TensorStore reports ENOSPC as a ValueError("RESOURCE_EXHAUSTED: ... No space left on device
    # [os_error_code='28']"); Python's own writes raise OSError(ENOSPC).
    while error is not None:
        if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _params_first(shapes: dict[str, tuple]) -> dict[str, tuple]:
    """The model's parameters before the optimizer's copies of them, so that a report's first keys say most."""
    return dict(sorted(shapes.items(), key=lambda item: not item[0].startswith("['params']")))


def _json(path: Path) -> tuple[Any, str | None]:
    """(contents, None), or (None, what is wrong) when the file is missing or not JSON; any other read error is
    raised: it proves nothing about the file."""
    try:
        return json.loads(path.read_bytes()), None
    except FileNotFoundError:
        return None, f"{path} is missing"
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return None, f"{path} does not parse: {one_line(error, 120)}"


def _location(ref: str, root: Path) -> tuple[Path, int]:
    """The file an OCDBT reference names and the size it must have at least: `kind:base/:relative:offset:length`
    (a B-tree node or an array's bytes), relative to the store's root."""
    where, offset, length = ref.split(":", 1)[1].rsplit(":", 2)
    base, relative = where.split(":", 1)
    return root / base / relative, int(offset) + int(length)


def _ocdbt_damage(root: Path, arrays: list[str]) -> str | None:
    """The first file the OCDBT store at `root` names that is missing or too short, or an array whose zarr
    metadata the store lacks. TensorStore reports a node that is missing, cut short or garbled as NOT_FOUND,
    OUT_OF_RANGE, DATA_LOSS or FAILED_PRECONDITION; any other status (a read that failed for another reason) is
    raised."""
    import tensorstore as ts  # Orbax's own storage layer

    def proof(error: Exception) -> str | None:
        text = str(error)
        return one_line(error, 200) if text.startswith(("NOT_FOUND", "DATA_LOSS", "FAILED_PRECONDITION", "OUT_OF_RANGE")) else None

    if not (root / "manifest.ocdbt").exists():
        return f"{root / 'manifest.ocdbt'} is missing"
    try:
        base = ts.KvStore.open(f"file://{root}/").result()
        versions = ts.ocdbt.dump(base).result()["versions"]
        nodes, sizes = [versions[-1]["root"]["location"]] if versions else [], {}
        while nodes:
            ref = nodes.pop()
            refs = [ref]
            for entry in ts.ocdbt.dump(base, ref).result()["entries"]:
                if "location" in entry:
                    nodes.append(entry["location"])
                elif "indirect_value" in entry:
                    refs.append(entry["indirect_value"])
            for path, size in map(lambda r: _location(r, root), refs):
                sizes[path] = max(sizes.get(path, 0), size)
        keys = set(ts.KvStore.open({"driver": "ocdbt", "base": f"file://{root}/"}).result().list().result())
    except ValueError as error:
        if (why := proof(error)) is None:
            raise
        return f"the array store {root} is unreadable: {why}"
    for path, size in sizes.items():
        have = path.stat().st_size if path.exists() else None
        if have is None or have < size:
            return f"{path} is " + ("missing" if have is None else f"{have:,} bytes, its index names {size:,}")
    lacking = [name for name in arrays if f"{name}/.zarray".encode() not in keys
               and f"{name}/zarr.json".encode() not in keys]
    return f"{root} lacks the arrays {_names(lacking)}" if lacking else None


def damage(step: Path) -> str | None:
    """What `step` (an Orbax step folder of this module's layout) lacks of what a complete step holds: the step's
    metadata, the `meta` item, the `state` item's metadata and every file its array store names. None when all
    is in place. A read that fails other than by a missing file or contents that do not parse is raised."""
    for path in (step / "_CHECKPOINT_METADATA", step / "meta" / "metadata"):
        if (why := _json(path)[1]) is not None:
            return why
    state = step / "state"
    metadata, why = _json(state / "_METADATA")
    if why is not None:
        return why
    if not isinstance(metadata, dict) or not isinstance(metadata.get("tree_metadata"), dict):
        return f"{state / '_METADATA'} names no arrays"
    arrays = [entry["key_metadata"][0]["key"] for entry in metadata["tree_metadata"].values()]
    if metadata.get("use_ocdbt", True):
        return _ocdbt_damage(state, arrays)
    lacking = [name for name in arrays if not (state / name).is_dir()]
    return f"{state} lacks the arrays {_names(lacking)}" if lacking else None


def flatten(tree: Any) -> dict[str, Any]:
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def unflatten(like: Any, flat: dict[str, Any]) -> Any:
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    return jax.tree_util.tree_unflatten(treedef, [flat[jax.tree_util.keystr(p)] for p, _ in paths])


class Checkpoints:
    def __init__(self, workdir: str | os.PathLike, keep: int, identity: dict[str, Any] | None = None):
        """identity: metadata that every checkpoint of the run carries and that a resume must match (its stage)."""
        self.directory = Path(workdir).resolve() / "checkpoints"
        self.identity = dict(identity or {})
        self._writing: tuple[int, int] | None = None  # (step, bytes of its arrays) of the save last started
        self._closed = False
        # Handlers named up front, so a fresh manager can read a step's metadata before restoring it.
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                                 cleanup_tmp_directories=True, create=True),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _data_file(self, step: int, process: int | None = None) -> Path:
        index = jax.process_index() if process is None else process
        return self.directory / "data_state" / f"step_{step}.process_{index}.json"

    @contextlib.contextmanager
    def _space_checked(self) -> Iterator[None]:
        """Turn running out of disk space in the block (in this save, or the background write of the one before)
        into DiskFull."""
        try:
            yield
        except DiskFull:
            raise
        except Exception as error:  # noqa: BLE001 - re-raised unless it is ENOSPC in disguise
            if not _out_of_space(error) or self._writing is None:
                raise
            step, needed = self._writing
            free = shutil.disk_usage(self.directory).free
            kept = [s for s in self.manager.all_steps() if s != step]
            raise DiskFull(errno.ENOSPC, f"no space left on device for checkpoint {step} in {self.directory}: it "
                           f"needs about {needed:,} bytes, {free:,} are free; "
                           + (f"checkpoint {max(kept)} is intact" if kept else "no earlier checkpoint")
                           + "; free space (or use another workdir) and rerun to resume") from error

    def save(self, step: int, state: Any, data_state: Any, meta: dict[str, Any]) -> None:
        """Asynchronous: returns once the arrays are copied off the devices; the write goes on behind."""
        path = self._data_file(step)
        flat = flatten(state)
        self.wait()  # Orbax waits for the previous save anyway; here its failure is reported as that step's
        with self._space_checked():
            self._writing = (step, sum(int(leaf.nbytes) for leaf in flat.values()))
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, data_state, indent=None)
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(flat),
                                                            meta=ocp.args.JsonSave(self.identity | meta)))
        # Iterator states of the steps Orbax has since deleted (max_to_keep) go too.
        kept = set(self.manager.all_steps()) | {step}
        for stale in path.parent.glob(f"step_*.process_{jax.process_index()}.json"):
            if int(stale.name.split(".")[0].removeprefix("step_")) not in kept:
                stale.unlink(missing_ok=True)

    def restore_latest(self, like: Any, shardings: Any) -> tuple[int, Any, Any, dict[str, Any]] | None:
        """(step, state, data state, metadata) of the newest checkpoint that is complete; None when there is none.

        Process 0 looks at the steps from the newest, sets each damaged one aside as `<step>.damaged` (kept for a
        look, out of the way of the save that will reach its number again) and tells every process which step
        to restore, so that all restore the same one. Restoring it raises whatever goes wrong (a checkpoint of
        another model among them, since falling back would silently restart the run).
        """
        chosen = -1
        if jax.process_index() == 0:
            for step in sorted(self.manager.all_steps(), reverse=True):
                why = damage(self.directory / str(step))
                if why is None:
                    chosen = step
                    break
                print(f"warning: checkpoint {self.directory / str(step)} is damaged: {why}; set aside as "
                      f"{step}.damaged, trying the checkpoint before it", file=sys.stderr)
                aside = self.directory / f"{step}.damaged"
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(self.directory / str(step), aside)
        # Also the barrier after which every process sees the steps set aside.
        chosen = int(multihost_utils.broadcast_one_to_all(np.int32(chosen)))
        self.manager.reload()
        return None if chosen < 0 else (chosen, *self.restore(chosen, like, shardings))

    def restore(self, step: int, like: Any, shardings: Any) -> tuple[Any, Any, dict[str, Any]]:
        """(state shaped and sharded like `like`/`shardings`, this process's data state, metadata).

        Raises DamagedCheckpoint where the step is proven damaged (see `damage`), and any other error as it is.
        """
        # `shardings` is a prefix of `like` (one sharding per model variable, which may hold several leaves or, as
        # optax's MaskedNode, none), so each sharding is spread over its subtree rather than zipped leaf by leaf.
        target = flatten(jax.tree.map(
            lambda sharding, subtree: jax.tree.map(
                lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), subtree),
            shardings, like))
        with self._damage_named(step):
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            stored = self.manager.item_metadata(step)["state"]
            if stored is None:
                raise FileNotFoundError(f"checkpoint {self.directory / str(step)} has no metadata for its arrays")
        self._check_matches(step, target, meta, stored)
        with self._damage_named(step):
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                          meta=ocp.args.JsonRestore()))
        return unflatten(like, restored["state"]), self._data_state(step), dict(restored["meta"])

    @contextlib.contextmanager
    def _damage_named(self, step: int) -> Iterator[None]:
        """An error in the block becomes DamagedCheckpoint if the step's files show damage; else it stays as is."""
        try:
            yield
        except Exception as error:  # noqa: BLE001 - Orbax and TensorStore report missing files with many types
            why = damage(self.directory / str(step))
            if why is None:
                raise
            raise DamagedCheckpoint(f"checkpoint {self.directory / str(step)} is damaged: {why}") from error

    def _data_state(self, step: int) -> Any:
        """This process's loader position at `step`. Every process says whether it has its file, so that a missing
        one stops all of them (rather than one, with the others waiting for it)."""
        path = self._data_file(step)
        present = multihost_utils.process_allgather(np.asarray(path.exists()))
        lacking = [self._data_file(step, index).name for index, ok in enumerate(np.ravel(present)) if not ok]
        if lacking:
            raise FileNotFoundError(f"checkpoint {self.directory / str(step)} has no loader state "
                                    f"{self.directory / 'data_state' / lacking[0]}"
                                    + (f" (nor {', '.join(lacking[1:])})" if lacking[1:] else "")
                                    + ": resuming would start the epoch over; restore the file or delete the step")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: the loader state of checkpoint {step} does not parse: {error}") from None

    def _check_matches(self, step: int, target: dict[str, jax.ShapeDtypeStruct], meta: dict[str, Any],
                       stored: dict[str, Any]) -> None:
        """Raise a ValueError naming another identity (stage), and every array the stored step (its `meta` item and
        the metadata of its arrays) lacks, has in excess, or has in another shape."""
        where = self.directory / str(step)
        have = _params_first({key: tuple(array.shape) for key, array in stored.items()})
        want = _params_first({key: tuple(leaf.shape) for key, leaf in target.items()})
        problems = [f"it was written by a run with {key}={meta[key]!r}, this run has {key}={value!r}"
                    for key, value in self.identity.items() if meta.get(key, value) != value]
        problems += [mismatch] if (mismatch := key_mismatch(have, want, limit=6)) else []
        if problems:
            raise UserError(f"checkpoint {where} does not match this run's model and optimizer (another stage, "
                            f"model size or training mode? use another workdir): " + "; ".join(problems))

    def check(self) -> None:
        """Raise the error of a background write that has failed (DiskFull for ENOSPC); never waits for a write
        in progress. (Orbax's check_for_errors misses a failure in its finalize thread; waiting on a finished
        save returns at once or raises it.)"""
        if not self.manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        with self._space_checked():
            self.manager.wait_until_finished()

    def close(self) -> None:
        """Wait for the save in flight to commit, then release the manager; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        self.wait()
        # The manager's start-up clean-up of temporary folders runs in a thread of its own that close() does not
        # join (orbax 0.12.8): a run that stops right after starting (bad data) would have it fail at the
        # interpreter's exit, with a traceback after the run's one-line error. Its first save awaits it too.
        getattr(self.manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
        self.manager.close()
