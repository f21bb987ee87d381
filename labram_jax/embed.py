"""Embeddings of a user's own recordings from a pretrained or fine-tuned LaBraM: `labram embed`.

Each recording goes through the original's preprocessing (data_prep.preprocess), is cut into windows, and every
window gets the fine-tuning model's features, fc_norm(mean of patch tokens) [D], and on request every patch's
[N*A, D]. A pretraining checkpoint is read as the original's fine-tuning script reads it (its `student.*`
weights, fc_norm fresh), so both kinds of checkpoint give the same kind of embedding.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from labram_jax.checkpoint import load_model
from labram_jax.convert import from_pytorch
from labram_jax.convert.state_dict import load_state_dict, state_dict, student_weights
from labram_jax.errors import UserError, one_line
from labram_jax.models.labram import LaBraM, LaBraMForMEM

MAX_TOKENS = 256  # the original's windows hold at most 256 patches (channels x seconds)


def load_encoder(checkpoint: str | os.PathLike) -> LaBraM:
    """A LaBraM model from a .pth (fine-tuning or pretraining) or a labram-jax export (of either)."""
    path = Path(checkpoint)
    if not path.is_dir():
        return from_pytorch(path, "classify")
    model = load_model(path)
    if isinstance(model, LaBraM):
        return model
    if not isinstance(model, LaBraMForMEM):
        raise UserError(f"{path}: a {type(model).__name__} export has no LaBraM encoder to embed with")
    encoder = LaBraM(model.cfg.replace(num_classes=0), rngs=nnx.Rngs(0))
    weights = student_weights({f"student.{k}": v for k, v in state_dict(model.student).items()})
    load_state_dict(encoder, weights, allow_missing=("fc_norm.",), source=str(path))
    return encoder


def embed(checkpoint: str | os.PathLike, recordings: list[str | os.PathLike], *, window: int | None = None,
          stride: int | None = None, patches: bool = False, notch: float = 50.0,
          batch_size: int = 32) -> dict[str, Any]:
    """Embeddings of every window of every recording, with where each window comes from."""
    from data_prep.discover import not_a_file
    from data_prep.preprocess import preprocess, read_recording, to_model_input, windows

    model = load_encoder(checkpoint)
    graphdef, state = nnx.split(model)

    @jax.jit
    def features(state, x, chans):
        net = nnx.merge(graphdef, state)
        tokens = net.tokens(x, chans)
        return net.fc_norm(tokens[:, 1:].mean(axis=1)), net.fc_norm(tokens[:, 1:])

    out: dict[str, Any] = {"embeddings": [], "recording": [], "start": [], "recordings": [], "channels": []}
    patch_out: dict[str, np.ndarray] = {}
    for index, path in enumerate(recordings):
        if special := not_a_file(Path(path)):  # MNE would wait on a FIFO for good (a folder may be a .mff)
            raise UserError(f"{path}: {special}")
        try:
            recording = preprocess(read_recording(path), notch=notch, source=str(path))
        except ValueError as error:  # not a recording MNE reads, or one preprocessing refuses: its own one line
            raise UserError(one_line(error)) from None
        n = recording.signal.shape[0]
        seconds = window or max(1, min(model.cfg.time_rows, MAX_TOKENS // n))
        step = stride or seconds
        x = to_model_input(windows(recording.signal, seconds, step))
        if not len(x):
            raise UserError(f"{path}: {recording.duration:.1f} s is shorter than one {seconds} s window")
        chans = jnp.asarray(recording.channels.input_chans)
        pooled, per_patch = [], []
        for start in range(0, len(x), batch_size):
            batch = x[start:start + batch_size]
            # Pad the last batch to the full size so every call reuses one compiled program.
            padded = np.concatenate([batch, np.zeros((batch_size - len(batch),) + batch.shape[1:], batch.dtype)])
            # Exact float32 matmuls on GPUs too (their default takes reduced-precision passes), as the trainer's.
            with jax.default_matmul_precision("highest"):
                p, t = features(state, jnp.asarray(padded), chans)
            pooled.append(np.asarray(p)[:len(batch)])
            if patches:
                per_patch.append(np.asarray(t)[:len(batch)])
        out["embeddings"].append(np.concatenate(pooled))
        out["recording"].append(np.full(len(x), index, np.int32))
        out["start"].append(np.arange(len(x), dtype=np.float32) * step)
        out["recordings"].append(str(path))
        out["channels"].append(" ".join(recording.channels.names))
        if patches:  # per recording: montages differ, so patch arrays do not stack across recordings
            patch_out[f"patches_{index}"] = np.concatenate(per_patch)
    result = {"embeddings": np.concatenate(out["embeddings"]), "recording": np.concatenate(out["recording"]),
              "start": np.concatenate(out["start"]), "recordings": np.asarray(out["recordings"]),
              "channels": np.asarray(out["channels"])}
    return result | patch_out
