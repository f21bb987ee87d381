"""Move LaBraM weights between the original PyTorch checkpoints and labram-jax models, in both directions."""
from __future__ import annotations

import os

import numpy as np

from labram_jax.convert.pth import read_pth, write_pth
from labram_jax.convert.safetensors_file import read_safetensors, write_safetensors
from labram_jax.configs import MAX_PATCHES
from labram_jax.convert.state_dict import (Model, ModelKind, checked_build, infer_config, kind_of, load_state_dict,
                                           state_dict, student_weights, resize_time_rows)
from labram_jax.errors import UserError


def _model_weights(obj: object, source: str) -> dict:
    """The state dict inside a .pth: `{'model': sd}` (or 'module', 'state_dict', as the original's loaders try)
    or a bare state dict."""
    if isinstance(obj, dict):
        for key in ("model", "module", "state_dict"):
            if isinstance(obj.get(key), dict):
                return obj[key]
        if obj and all(isinstance(k, str) and hasattr(v, "shape") for k, v in obj.items()):
            return obj
    raise UserError(f"{source}: no state dict found (expected {{'model': state_dict}} or a bare state dict)")


def _is_safetensors(path: str | os.PathLike) -> bool:
    return os.fspath(path).endswith(".safetensors")


def from_pytorch(path: str | os.PathLike, kind: ModelKind = "classify", *, num_classes: int | None = None,
                 head_dim: int | None = None, seed: int = 0) -> Model:
    """Load a .pth written by the original code (or a .safetensors of the same state dict) into a ready
    labram-jax model.

    kind, the model kind: "classify" (NeuralTransformer; also accepts a pretraining checkpoint and keeps its
    `student.*` weights as the original's fine-tuning loader does, leaving fc_norm and head freshly initialised),
    "pretrain" (NeuralTransformerForMEM) or "tokenizer" (VQNSP). The architecture is read from the weights' shapes.
    num_classes sets the head when fine-tuning from a pretraining checkpoint (or replaces a checkpoint's head).
    head_dim is needed only for tokenizers whose head size is not LaBraM's 20.
    Raises ValueError naming every missing, unexpected or mis-shaped key: it never loads half a model.
    """
    source = os.fspath(path)
    weights = read_safetensors(path) if _is_safetensors(path) else _model_weights(read_pth(path), source)
    fresh: tuple[str, ...] = ()
    if kind == "classify" and any(k.startswith("student.") for k in weights):
        weights, fresh = student_weights(weights), ("fc_norm.", "head.")
    elif kind == "classify" and num_classes is not None and weights.get("head.weight") is not None \
            and weights["head.weight"].shape[0] != num_classes:
        # As the original's fine-tuning script: a head of another width is dropped, not loaded.
        weights = {k: v for k, v in weights.items() if not k.startswith("head.")}
        fresh = ("head.",)
    cfg = infer_config(weights, kind, source, num_classes=num_classes, head_dim=head_dim)
    return checked_build(cfg, kind, weights, allow_missing=fresh, source=source, seed=seed)


def original_state_dict(model: Model, *, truncate_time: bool = False) -> dict:
    """The state dict the original loads with strict=True: its 16 time_embed rows. A model with more (windows past
    16 s) is refused in one line, or with `truncate_time` cut to its first 16 rows (windows of at most 16 s)."""
    weights = state_dict(model)
    rows = max(np.shape(v)[1] for k, v in weights.items() if k.split(".")[-1] == "time_embed")
    if rows > MAX_PATCHES and not truncate_time:
        raise UserError(f"the model has {rows} time_embed rows (windows up to {rows} s); the original LaBraM has "
                        f"{MAX_PATCHES} and would not load it: truncate to its first {MAX_PATCHES} rows (labram "
                        "convert --truncate-time), or keep it as a labram-jax export")
    return resize_time_rows(weights, MAX_PATCHES, "truncate") if rows > MAX_PATCHES else weights


def to_pytorch(model: Model, path: str | os.PathLike, *, truncate_time: bool = False) -> None:
    """Write `{'model': state_dict}` in the original's key layout, which the original loads with strict=True; a
    path ending in .safetensors gets the same state dict as a safetensors file. `truncate_time`: as
    original_state_dict."""
    weights = original_state_dict(model, truncate_time=truncate_time)
    if _is_safetensors(path):
        write_safetensors(path, weights)
    else:
        write_pth(path, {"model": weights})


__all__ = ["from_pytorch", "to_pytorch", "original_state_dict", "read_pth", "write_pth", "read_safetensors",
           "write_safetensors", "state_dict", "load_state_dict", "kind_of"]
