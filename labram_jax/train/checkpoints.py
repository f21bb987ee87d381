"""Orbax checkpoints of a training run: the train state, the data iterator's position and the run's metadata.

The state is saved as a flat {path: array} dict, so it restores onto any mesh or device count: the restore target
carries the new run's shardings. Orbax writes each step into a temporary folder and renames it when complete, so
a save cut in the middle leaves the previous checkpoint usable; such leftovers are removed at the next start. A
step that is damaged all the same (storage without atomic renames, files deleted by hand) is skipped with a
warning, and the one before it restored. Each process's grain iterator state is its own JSON file beside the
step, since processes read different slices.
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
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from labram_jax.errors import UserError


class DamagedCheckpoint(RuntimeError):
    """A checkpoint step whose files cannot be read back."""


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


def _one_line(error: BaseException, limit: int = 300) -> str:
    return " ".join(str(error).split())[:limit]


def _names(keys: list[str], limit: int = 6) -> str:
    """The first few keys, the model's parameters before the optimizer's copies of them."""
    keys = sorted(keys, key=lambda key: not key.startswith("['params']"))
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


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
        # Handlers named up front, so a fresh manager can read a step's metadata before restoring it.
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                                 cleanup_tmp_directories=True, create=True),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _data_file(self, step: int) -> Path:
        return self.directory / "data_state" / f"step_{step}.process_{jax.process_index()}.json"

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
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data_state))
            os.replace(tmp, path)
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(flat),
                                                            meta=ocp.args.JsonSave(self.identity | meta)))
        # Iterator states of the steps Orbax has since deleted (max_to_keep) go too.
        kept = set(self.manager.all_steps()) | {step}
        for stale in path.parent.glob(f"step_*.process_{jax.process_index()}.json"):
            if int(stale.name.split(".")[0].removeprefix("step_")) not in kept:
                stale.unlink(missing_ok=True)

    def restore_latest(self, like: Any, shardings: Any) -> tuple[int, Any, Any, dict[str, Any]] | None:
        """(step, state, data state, metadata) of the newest checkpoint that reads back; None when there is none.

        A damaged step is reported and set aside as `<step>.damaged` (kept for a look, out of the way of the save
        that will reach its number again) and the previous one tried; a checkpoint of another model raises, since
        falling back would silently restart the run.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return (step, *self.restore(step, like, shardings))
            except DamagedCheckpoint as error:
                print(f"warning: {error}; set aside as {step}.damaged, trying the checkpoint before it",
                      file=sys.stderr)
                if jax.process_index() == 0:
                    aside = self.directory / f"{step}.damaged"
                    shutil.rmtree(aside, ignore_errors=True)
                    os.replace(self.directory / str(step), aside)
                multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
                self.manager.reload()
        return None

    def restore(self, step: int, like: Any, shardings: Any) -> tuple[Any, Any, dict[str, Any]]:
        """(state shaped and sharded like `like`/`shardings`, this process's data state, metadata)."""
        # `shardings` is a prefix of `like` (one sharding per model variable, which may hold several leaves or, as
        # optax's MaskedNode, none), so each sharding is spread over its subtree rather than zipped leaf by leaf.
        target = flatten(jax.tree.map(
            lambda sharding, subtree: jax.tree.map(
                lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), subtree),
            shardings, like))
        self._check_matches(step, target)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                          meta=ocp.args.JsonRestore()))
        except Exception as error:  # noqa: BLE001 - Orbax and TensorStore report missing files with many types
            raise DamagedCheckpoint(f"checkpoint {self.directory / str(step)} is unreadable: "
                                    f"{_one_line(error)}") from error
        data_file = self._data_file(step)
        data_state = json.loads(data_file.read_text()) if data_file.exists() else None
        return unflatten(like, restored["state"]), data_state, dict(restored["meta"])

    def _check_matches(self, step: int, target: dict[str, jax.ShapeDtypeStruct]) -> None:
        """Raise a ValueError naming another identity (stage), and every array the stored step lacks, has in
        excess, or has in another shape."""
        where = self.directory / str(step)
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            stored = self.manager.item_metadata(step)["state"]
        except Exception as error:  # noqa: BLE001 - as in restore
            raise DamagedCheckpoint(f"checkpoint {where} has unreadable metadata: {_one_line(error)}") from error
        if stored is None:
            raise DamagedCheckpoint(f"checkpoint {where} has no metadata for its arrays")
        have = {key: tuple(meta.shape) for key, meta in stored.items()}
        want = {key: tuple(leaf.shape) for key, leaf in target.items()}
        problems = [f"it was written by a run with {key}={meta[key]!r}, this run has {key}={value!r}"
                    for key, value in self.identity.items() if meta.get(key, value) != value]
        problems += [f"{label}: {_names(keys)}" for label, keys in (
            ("missing", [k for k in want if k not in have]),
            ("unexpected", [k for k in have if k not in want]),
            ("wrong shape", [f"{k} {have[k]} (expected {want[k]})" for k in want
                             if k in have and have[k] != want[k]]),
        ) if keys]
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
        self.wait()
        self.manager.close()
