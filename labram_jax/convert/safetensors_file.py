"""Read and write `.safetensors` files: a flat {key: tensor} in the original's key layout (the `model` dict of a
`.pth`), or in braindecode's for its `from_pretrained`. The format holds tensors only, no pickled code."""
from __future__ import annotations

import os

import numpy as np
import safetensors
import safetensors.numpy

from labram_jax.errors import UserError, one_line
from labram_jax.files import replace_atomically


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor in the file, as numpy arrays (the format keeps no order: keys come back sorted)."""
    name = os.fspath(path)
    try:
        return safetensors.numpy.load_file(name)
    except safetensors.SafetensorError as error:
        raise UserError(f"{name}: not a safetensors file ({one_line(error)})") from None


def write_safetensors(path: str | os.PathLike, weights: dict[str, np.ndarray]) -> None:
    """Write `weights`, replacing `path` atomically; the metadata says "pt", which Hugging Face's and torch's
    loaders expect of PyTorch weights."""
    data = safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in weights.items()}, metadata={"format": "pt"})
    replace_atomically(path, lambda f: f.write(data))
