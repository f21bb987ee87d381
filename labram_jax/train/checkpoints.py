"""Orbax checkpoints of a training run: the train state, the data iterator's position and the run's metadata.

The state is saved as a flat {path: array} dict, so it restores onto any mesh or device count: the restore target
carries the new run's shardings. Orbax writes each step into a temporary folder and renames it when complete, so
a save cut in the middle leaves the previous checkpoint usable; such leftovers are removed at the next start.
Each process's grain iterator state is its own JSON file beside the step, since processes read different slices.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def flatten(tree: Any) -> dict[str, Any]:
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def unflatten(like: Any, flat: dict[str, Any]) -> Any:
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    return jax.tree_util.tree_unflatten(treedef, [flat[jax.tree_util.keystr(p)] for p, _ in paths])


class Checkpoints:
    def __init__(self, workdir: str | os.PathLike, keep: int):
        self.directory = Path(workdir).resolve() / "checkpoints"
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                                 cleanup_tmp_directories=True, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _data_file(self, step: int) -> Path:
        return self.directory / "data_state" / f"step_{step}.process_{jax.process_index()}.json"

    def save(self, step: int, state: Any, data_state: Any, meta: dict[str, Any]) -> None:
        """Asynchronous: returns once the arrays are copied off the devices; the write goes on behind."""
        path = self._data_file(step)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data_state))
        os.replace(tmp, path)
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(flatten(state)),
                                                        meta=ocp.args.JsonSave(meta)))

    def restore(self, step: int, like: Any, shardings: Any) -> tuple[Any, Any, dict[str, Any]]:
        """(state shaped and sharded like `like`/`shardings`, this process's data state, metadata)."""
        target = {key: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
                  for (key, leaf), sharding in zip(flatten(like).items(), flatten(shardings).values())}
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                          meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError) as error:
            raise ValueError(f"{self.directory / str(step)} does not match this run's model and optimizer "
                             f"(another stage or size?): {' '.join(str(error).split())[:500]}") from None
        data_file = self._data_file(step)
        data_state = json.loads(data_file.read_text()) if data_file.exists() else None
        return unflatten(like, restored["state"]), data_state, dict(restored["meta"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
