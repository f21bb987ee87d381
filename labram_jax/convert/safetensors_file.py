"""Read and write `.safetensors` files: a flat {key: tensor} in the original's key layout (the `model` dict of a
`.pth`), or in braindecode's for its `from_pretrained`. The format holds tensors only, no pickled code."""
from __future__ import annotations

import json
import os

import numpy as np
import safetensors
import safetensors.numpy

from labram_jax.errors import UserError, one_line
from labram_jax.files import check_regular, replace_atomically


# The dtypes numpy holds (the format also has float8 and others, which numpy cannot).
DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL")
HEADER_MAX_BYTES = 100 * 2 ** 20  # safetensors' own limit


def _check_header(name: str) -> None:
    """The header's tensors against the file before anything is read: dtypes numpy holds, each tensor's bytes
    within the file's data."""
    size = os.path.getsize(name)
    with open(name, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= min(HEADER_MAX_BYTES, size - 8):
            raise UserError(f"{name}: not a safetensors file (a header of {length} bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(length))
        except ValueError as error:
            raise UserError(f"{name}: not a safetensors file (header: {one_line(error)})") from None
    if not isinstance(header, dict):
        raise UserError(f"{name}: not a safetensors file (its header is not a JSON object)")
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if dtype not in DTYPES:
            raise UserError(f"{name}: tensor {key!r} has dtype {dtype!r}; this reader takes "
                            f"{', '.join(DTYPES)}")


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor in the file, as numpy arrays (the format keeps no order: keys come back sorted). safetensors
    checks every tensor's offsets against the file; the dtypes are checked first (numpy has no float8)."""
    name = os.fspath(path)
    check_regular(name)
    _check_header(name)
    try:
        return safetensors.numpy.load_file(name)
    except safetensors.SafetensorError as error:
        raise UserError(f"{name}: not a safetensors file ({one_line(error)})") from None


def write_safetensors(path: str | os.PathLike, weights: dict[str, np.ndarray]) -> None:
    """Write `weights`, replacing `path` atomically; the metadata says "pt", which Hugging Face's and torch's
    loaders expect of PyTorch weights."""
    data = safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in weights.items()}, metadata={"format": "pt"})
    replace_atomically(path, lambda f: f.write(data))
