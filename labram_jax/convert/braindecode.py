"""Weights between labram-jax and braindecode's `Labram` (braindecode 1.8.1), in both directions, without torch.

braindecode's `Labram.from_pretrained(DIR)` builds `Labram(**DIR/config.json)` and loads `DIR/model.safetensors`
into it. Its Labram is the original's fine-tuning model with `use_mean_pooling=True` (not braindecode's default)
under other module names (KEY_MAP), so an export is the original's state dict renamed key for key, beside the
constructor arguments that rebuild the same architecture.

One shape differs: braindecode fixes the window at construction, `n_times` samples at 200 Hz, and keeps
n_times / 200 + 1 rows of the time embedding where the original keeps 16. The default n_times=3000 keeps all 16
(as braindecode's own Hub checkpoint does), so the round trip is exact; a smaller n_times fits a dataset's window
and drops the last rows, which an import sets back to zero, with a warning each way.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from labram_jax.configs import MAX_PATCHES, NUM_CHANNEL_ROWS, PATCH_SIZE, TransformerConfig
from labram_jax.convert.safetensors_file import read_safetensors, write_safetensors
from labram_jax.convert.state_dict import (Model, Renames, checked_build, infer_config, rename, state_dict,
                                           kind_of)
from labram_jax.errors import UserError
from labram_jax.files import read_json_object, write_json
from labram_jax.models.labram import LaBraM

VERSION = "1.8.1"  # the braindecode release whose Labram this layout was checked against
CONFIG, WEIGHTS = "config.json", "model.safetensors"
DEFAULT_N_TIMES = (MAX_PATCHES - 1) * PATCH_SIZE  # 3000 // 200 + 1 = 16 rows: all of time_embed

# (original, braindecode): "*" is a block number; a name ending in "." renames a prefix, any other a whole key.
KEY_MAP = (("pos_embed", "position_embedding"), ("time_embed", "temporal_embedding"),
           ("patch_embed.", "patch_embed.temporal_conv."), ("blocks.*.mlp.fc1.", "blocks.*.mlp.0."),
           ("blocks.*.mlp.fc2.", "blocks.*.mlp.2."), ("head.", "final_layer."))


def _rules(pairs: Any) -> Renames:
    def pattern(name: str) -> re.Pattern:
        return re.compile("^" + re.escape(name).replace(r"\*", r"(\d+)") + ("" if name.endswith(".") else "$"))
    return tuple((pattern(a), b.replace("*", r"\1")) for a, b in pairs)


_TO_BRAINDECODE = _rules(KEY_MAP)
_TO_ORIGINAL = _rules((b, a) for a, b in KEY_MAP)


def braindecode_key(key: str) -> str:
    """braindecode's name for a key of the original's state dict."""
    return rename(key, _TO_BRAINDECODE)


def original_key(key: str) -> str:
    """The original's name for a key of braindecode's Labram."""
    return rename(key, _TO_ORIGINAL)


class TimeEmbeddingWarning(UserWarning):
    """Rows of time_embed were dropped (an export with a short n_times) or set to zero (its import)."""


_LAYER_NORM = "torch.nn.modules.normalization.LayerNorm"
_GELU = "torch.nn.modules.activation.GELU"
_ALIASES = {"torch.nn.LayerNorm": _LAYER_NORM, "torch.nn.GELU": _GELU}  # other spellings braindecode resolves
# Constructor arguments that make braindecode's Labram LaBraM's fine-tuning model, whatever the weights.
_REQUIRED = {"patch_size": PATCH_SIZE, "learned_patcher": False, "neural_tokenizer": True, "use_abs_pos_emb": True,
             "use_mean_pooling": True, "norm_layer": _LAYER_NORM, "activation": _GELU, "qk_scale": None,
             "attn_head_dim": None}
# braindecode 1.8.1's defaults, which apply where config.json leaves an argument out.
_DEFAULTS = {**_REQUIRED, "use_mean_pooling": False, "num_layers": 12, "num_heads": 10, "mlp_ratio": 4.0,
             "qkv_bias": False, "qk_norm": _LAYER_NORM, "init_values": 0.1, "conv_out_channels": 8,
             "drop_prob": 0.0, "attn_drop_prob": 0.0, "drop_path_prob": 0.0, "init_scale": 0.001,
             "n_outputs": None, "n_times": None}


def braindecode_config(cfg: TransformerConfig, n_times: int = DEFAULT_N_TIMES) -> dict[str, Any]:
    """`Labram`'s constructor arguments for `cfg`, every one written out (braindecode's own defaults differ)."""
    return {"n_times": n_times, "n_outputs": cfg.num_classes, "chs_info": None, "n_chans": NUM_CHANNEL_ROWS,
            "sfreq": 200.0, "input_window_seconds": None, "patch_size": PATCH_SIZE, "learned_patcher": False,
            "embed_dim": cfg.embed_dim, "conv_in_channels": 1, "conv_out_channels": cfg.out_chans,
            "num_layers": cfg.depth, "num_heads": cfg.num_heads, "mlp_ratio": cfg.mlp_ratio,
            "qkv_bias": cfg.qkv_bias, "qk_norm": _LAYER_NORM if cfg.qk_norm else None, "qk_scale": None,
            "drop_prob": cfg.drop_rate, "attn_drop_prob": cfg.attn_drop_rate, "drop_path_prob": cfg.drop_path_rate,
            "norm_layer": _LAYER_NORM, "init_values": cfg.init_values or None, "use_abs_pos_emb": True,
            "use_mean_pooling": True, "init_scale": cfg.init_scale, "neural_tokenizer": True,
            "attn_head_dim": None, "activation": _GELU, "braindecode_version": VERSION}


def n_times_of(model: Model) -> int:
    """The window, in samples, whose braindecode temporal_embedding holds all of `model`'s time_embed rows (3000
    for the original's 16: braindecode gives n_times // 200 + 1 rows)."""
    return (model.cfg.time_rows - 1) * PATCH_SIZE if isinstance(model, LaBraM) else DEFAULT_N_TIMES


def _time_rows(n_times: int, have: int) -> int:
    """Rows of braindecode's temporal_embedding for a window of n_times samples, of the model's `have`."""
    if isinstance(n_times, bool) or not isinstance(n_times, int) or n_times < PATCH_SIZE:
        raise UserError(f"n_times must be a whole number of {PATCH_SIZE}-sample patches, got {n_times!r}")
    if n_times % PATCH_SIZE:
        raise UserError(f"n_times {n_times} is not a multiple of {PATCH_SIZE} (samples per patch at 200 Hz)")
    rows = n_times // PATCH_SIZE + 1
    if rows > have:
        raise UserError(f"n_times {n_times} needs {rows} time_embed rows; the model has {have} "
                         f"(n_times at most {(have - 1) * PATCH_SIZE})")
    return rows


def to_braindecode(model: Model, directory: str | os.PathLike, *, n_times: int | None = None) -> Path:
    """Write `model` as a directory that braindecode's `Labram.from_pretrained` loads; returns its path.
    n_times: the window braindecode's model takes (default n_times_of(model), all of its time_embed rows).

    `directory` must not exist or be empty. config.json is written last, so a directory that has one is whole.
    """
    if not isinstance(model, LaBraM):
        raise UserError(f"braindecode's Labram is LaBraM's fine-tuning model: a {kind_of(model)} model has no "
                         "counterpart there")
    if model.cfg.layer_norm_eps != 1e-6:
        raise UserError(f"layer_norm_eps {model.cfg.layer_norm_eps}: braindecode's Labram fixes 1e-6")
    n_times = n_times_of(model) if n_times is None else n_times
    have = model.cfg.time_rows
    rows = _time_rows(n_times, have)
    target = Path(directory).resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"{target}: already exists and is not an empty directory")
    weights = state_dict(model, layout=braindecode_key)
    if rows < have:
        warnings.warn(f"n_times={n_times} keeps time_embed rows 0-{rows - 1}; rows {rows}-{have - 1} are "
                      "dropped (an import back sets them to zero)", TimeEmbeddingWarning, stacklevel=2)
        weights["temporal_embedding"] = weights["temporal_embedding"][:, :rows]
    target.mkdir(parents=True, exist_ok=True)
    write_safetensors(target / WEIGHTS, weights)
    write_json(target / CONFIG, braindecode_config(model.cfg, n_times), indent=2)
    return target


def _read_config(path: Path) -> dict[str, Any]:
    return read_json_object(path / CONFIG, f"{path}: not a braindecode model directory (no {CONFIG})",
                            "a JSON object of Labram's constructor arguments")


def _argument(config: dict[str, Any], key: str) -> Any:
    value = config.get(key, _DEFAULTS[key])
    return _ALIASES.get(value, value) if isinstance(value, str) else value


def from_braindecode(directory: str | os.PathLike, *, seed: int = 0) -> LaBraM:
    """The labram-jax model of a braindecode `Labram` directory (config.json + model.safetensors).

    Strict where braindecode's own loader (strict=False) is not: every constructor argument that changes the
    model must be LaBraM's, config.json must describe the weights it sits beside, and one error names every
    missing, unexpected or mis-shaped tensor. A temporal_embedding of fewer than 16 rows (a smaller n_times) is
    padded with zero rows, with a warning; one of more (a window past 16 s) gives a model with as many.
    """
    path = Path(directory)
    config, config_path, weights_path = _read_config(path), path / CONFIG, path / WEIGHTS
    wrong = [f"{key}={_argument(config, key)!r} (LaBraM needs {need!r})" for key, need in _REQUIRED.items()
             if _argument(config, key) != need]
    if wrong:
        raise UserError(f"{config_path}: not LaBraM's fine-tuning model: {', '.join(wrong)}")
    if not weights_path.is_file():
        raise UserError(f"{path}: no {WEIGHTS}")
    weights = read_safetensors(weights_path)
    original = {original_key(k): v for k, v in weights.items()}
    heads = _argument(config, "num_heads")
    width = original["cls_token"].shape[-1] if "cls_token" in original else None
    head_dim = width // heads if width and isinstance(heads, int) and heads > 0 else None
    cfg = infer_config(original, "classify", str(weights_path), head_dim=head_dim)

    n_times = _argument(config, "n_times")
    rows = weights["temporal_embedding"].shape[1] if "temporal_embedding" in weights else None
    described = {"num_layers": (cfg.depth, f"{cfg.depth} blocks"),
                 "num_heads": (cfg.num_heads, f"q_norm of {cfg.head_dim}, {cfg.num_heads} heads"),
                 "qkv_bias": (cfg.qkv_bias, "q_bias" if cfg.qkv_bias else "no q_bias"),
                 "qk_norm": (_LAYER_NORM if cfg.qk_norm else None, "q_norm" if cfg.qk_norm else "no q_norm"),
                 "conv_out_channels": (cfg.out_chans, f"conv1 of {cfg.out_chans} channels"),
                 "n_outputs": (cfg.num_classes, f"final_layer of {cfg.num_classes}")}
    mismatches = [f"{key} {_argument(config, key)!r} does not match {WEIGHTS} ({what})"
                  for key, (value, what) in described.items() if _argument(config, key) != value]
    hidden = int(cfg.embed_dim * cfg.mlp_ratio)
    ratio = _argument(config, "mlp_ratio")
    if not isinstance(ratio, (int, float)) or int(cfg.embed_dim * ratio) != hidden:
        mismatches.append(f"mlp_ratio {ratio!r} does not match {WEIGHTS} (hidden width {hidden})")
    if bool(_argument(config, "init_values")) != bool(cfg.init_values):
        mismatches.append(f"init_values {_argument(config, 'init_values')!r} does not match {WEIGHTS} "
                          f"({'gamma_1' if cfg.init_values else 'no gamma_1'})")
    if rows is not None and (isinstance(n_times, bool) or not isinstance(n_times, int)
                             or n_times // PATCH_SIZE + 1 != rows):
        mismatches.append(f"n_times {n_times!r} does not match {WEIGHTS} (temporal_embedding of {rows} rows)")
    if mismatches:
        raise UserError(f"{config_path}: " + "; ".join(mismatches))

    if rows is not None and rows < MAX_PATCHES:
        cfg = cfg.replace(time_rows=MAX_PATCHES)
        time = weights["temporal_embedding"]
        weights["temporal_embedding"] = np.concatenate(
            [time, np.zeros((1, MAX_PATCHES - rows) + time.shape[2:], time.dtype)], axis=1)
        warnings.warn(f"{weights_path}: temporal_embedding has {rows} rows (n_times={n_times}); time_embed rows "
                      f"{rows}-{MAX_PATCHES - 1} are set to zero, so patches past {rows} s of a window get no "
                      "learned temporal embedding", TimeEmbeddingWarning, stacklevel=2)

    numbers = {key: _argument(config, key) for key in ("drop_prob", "attn_drop_prob", "drop_path_prob",
                                                        "init_scale", "init_values")}
    bad = [f"{key} {value!r}" for key, value in numbers.items()
           if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)))]
    if bad:
        raise UserError(f"{config_path}: not numbers: {', '.join(bad)}")
    cfg = cfg.replace(drop_rate=float(numbers["drop_prob"]), attn_drop_rate=float(numbers["attn_drop_prob"]),
                      drop_path_rate=float(numbers["drop_path_prob"]), init_scale=float(numbers["init_scale"]),
                      init_values=float(numbers["init_values"] or 0.0))
    return checked_build(cfg, "classify", weights, source=str(weights_path), layout=braindecode_key, seed=seed)
