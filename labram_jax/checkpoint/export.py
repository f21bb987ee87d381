"""A parameters-only export: every model variable as an Orbax checkpoint, beside `labram.json` that rebuilds it.

Layout: `<dir>/labram.json` ({"format", "version", "kind", "config"}) and `<dir>/state/` (Orbax, the nested dict
of `nnx.to_pure_dict(nnx.state(model))`: Params and the tokenizer's Codebook state). No optimizer, no step.
"kind" is the model kind (classify, pretrain, tokenizer) and "config" its architecture only: a model loads with
the default runtime settings (float32, the explicit attention, no remat), and whoever runs it sets its own.
Version 1 exports, which named the kind "task" and kept the run's dtype, attention and remat, still load.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from labram_jax.configs import (RUNTIME_FIELDS, TokenizerConfig, TransformerConfig, architecture, check_size,
                                with_runtime)
from labram_jax.convert.state_dict import Model, build, kind_of
from labram_jax.errors import UserError, key_mismatch, one_line
from labram_jax.files import read_json_object, write_json

FORMAT = "labram-jax/params"
VERSION = 2
READS = (1, 2)  # the versions load_model reads
META = "labram.json"
STATE = "state"
KINDS = ("classify", "pretrain", "tokenizer")


def _checkpointer() -> ocp.StandardCheckpointer:
    """A checkpointer of this process alone: exports are written and read by one process (process 0 writes),
    while Orbax's default waits for every process of a multi-host run."""
    me = jax.process_index()
    return ocp.StandardCheckpointer(
        multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me}))


def save_model(model: Model, directory: str | os.PathLike) -> Path:
    """Write `model` to `directory`, which must not exist or be empty; returns its absolute path.

    Everything is written into a sibling `<dir>.tmp-<pid>` and renamed into place, so an interrupted save leaves
    no directory that `load_model` accepts.
    """
    target = Path(directory).resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"{target}: already exists and is not an empty directory")
    meta = {"format": FORMAT, "version": VERSION, "kind": kind_of(model), "config": architecture(model.cfg)}
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with _checkpointer() as checkpointer:
            checkpointer.save(tmp / STATE, nnx.to_pure_dict(nnx.state(model)))
            checkpointer.wait_until_finished()
        _write_meta(tmp, meta)
        if target.exists():
            target.rmdir()
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _write_meta(path: Path, meta: dict) -> None:
    write_json(path / META, meta)


def _read_meta(path: Path) -> dict:
    meta = read_json_object(path / META, f"{path}: not a labram-jax export (no {META})", f"a {FORMAT} export")
    if meta.get("format") != FORMAT:
        raise UserError(f"{path}: {META} is not a {FORMAT} export")
    if meta.get("version") not in READS:
        raise UserError(f"{path}: export version {meta.get('version')!r}; this labram-jax reads versions "
                        f"{', '.join(map(str, READS))}")
    kind = meta.get("kind" if meta["version"] >= 2 else "task")
    if kind not in KINDS:
        raise UserError(f"{path}: unknown model kind {kind!r} in {META}")
    return meta | {"kind": kind}


def _transformer(raw: dict, version: int, path: Path) -> TransformerConfig:
    runtime = [name for name in RUNTIME_FIELDS if name in raw]
    if runtime and version >= 2:
        raise UserError(f"{path / META}: config field {', '.join(runtime)} is a runtime setting, not architecture")
    return TransformerConfig(**{k: v for k, v in raw.items() if k not in RUNTIME_FIELDS})


def _config(meta: dict, path: Path) -> TransformerConfig | TokenizerConfig:
    version = meta["version"]
    try:
        raw = dict(meta["config"])
        if meta["kind"] == "tokenizer":
            raw["encoder"] = _transformer(raw["encoder"], version, path)
            raw["decoder"] = _transformer(raw["decoder"], version, path)
            return TokenizerConfig(**raw)
        return _transformer(raw, version, path)
    except UserError as error:
        raise (error if str(path) in str(error) else UserError(f"{path}: invalid config in {META}: {error}")) from None
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{path}: invalid config in {META}: {one_line(error)}") from None


def _flat(tree: object) -> dict[str, tuple[tuple[int, ...], str]]:
    """{'blocks.0.attn.qkv.kernel': (shape, dtype)} for a tree of arrays or of Orbax array metadata."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(str(getattr(k, "key", k)) for k in keys): (tuple(leaf.shape), str(leaf.dtype))
            for keys, leaf in leaves}


def _check_stored(stored: object, expected: object, path: Path, kind: str) -> None:
    problems = key_mismatch(_flat(stored), _flat(expected), wrong="wrong shape or dtype")
    if problems:
        raise UserError(f"{path}: stored arrays do not match the {kind} model of its config: {problems}")


def load_model(directory: str | os.PathLike, *, torch_order: bool = True, runtime: dict | None = None) -> Model:
    """The model saved in `directory` by `save_model`, restored onto the default device.

    torch_order=False builds it as shapes only, since every variable comes from the export (an eager build first
    draws them all at random, one small program per shape: 2-6 s of a run's start for a base tokenizer); NNX
    then sets a module's attributes in sorted order, so state_dict would list the keys in that order rather than
    the original's: for a model that is not written out as a state dict. `runtime`: runtime settings
    (configs.RUNTIME_FIELDS) to build it with, as the trainer runs it; an export keeps none."""
    path = Path(directory).resolve()
    meta = _read_meta(path)
    cfg = _with_runtime(_config(meta, path), runtime)
    check_size(cfg, str(path / META))
    # The stored arrays are checked against the model as shapes before anything is allocated.
    abstract = nnx.eval_shape(lambda: build(cfg, meta["kind"]))
    expected = nnx.to_pure_dict(nnx.state(abstract))
    # This process's own device: in a multi-host run jax.devices()[0] may belong to another process.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), expected)
    with _checkpointer() as checkpointer:
        try:
            stored = checkpointer.metadata(path / STATE).item_metadata
        except Exception as error:  # Orbax reports a missing or damaged checkpoint with assorted types
            raise UserError(f"{path}: no readable Orbax state: {one_line(error)}") from None
        _check_stored(stored, expected, path, meta["kind"])
        model = build(cfg, meta["kind"]) if torch_order else abstract
        state = nnx.state(model)
        restored = checkpointer.restore(path / STATE, target)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(model, state)
    return model


def model_config(directory: str | os.PathLike, runtime: dict | None = None
                 ) -> TransformerConfig | TokenizerConfig:
    """The config of the model saved in `directory` by `save_model` (without loading it), with `runtime` settings
    (configs.RUNTIME_FIELDS) where given."""
    path = Path(directory).resolve()
    return _with_runtime(_config(_read_meta(path), path), runtime)


def _with_runtime(cfg: TransformerConfig | TokenizerConfig, runtime: dict | None
                  ) -> TransformerConfig | TokenizerConfig:
    return with_runtime(cfg, **runtime) if runtime else cfg


def is_export(directory: str | os.PathLike) -> bool:
    """Whether `directory` looks like a `save_model` export (its labram.json names the format)."""
    path = Path(directory)
    try:
        _read_meta(path)
    except ValueError:
        return False
    return (path / STATE).is_dir()
