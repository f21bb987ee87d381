"""One preprocessed EEG window as an ArrayRecord record: the format shared by `labram prep` and the loaders.

A record is `MAGIC | u32 header length | JSON header | signal bytes | channel-row bytes`. The JSON header holds the
metadata and the arrays' shapes and dtypes; the arrays are raw little-endian bytes, so decoding is two
`np.frombuffer` calls (no pickle, no zip), which keeps the loader's per-record cost small.
"""
from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any

import numpy as np

from labram_jax.errors import UserError, one_line

MAGIC = b"LBRW1"  # LaBraM window, format 1
_LEN = struct.Struct("<I")
_BIDS_ENTITIES = ("session", "task", "run")


@dataclasses.dataclass(frozen=True)
class Window:
    """A window of preprocessed EEG: signal [N, A, 200] in µV at 200 Hz, cut into one-second patches."""

    signal: np.ndarray  # float32 or float16 [N, A, 200], µV (the model divides by 100)
    channel_rows: np.ndarray  # int16 [N], pos_embed rows 1..128 (labram_jax.channels)
    channel_names: tuple[str, ...]
    recording: str  # source recording id (its path relative to the input, or a corpus id)
    start: float  # window start, seconds from the recording's start
    dataset: str = ""
    subject: str = ""
    label: float | int | None = None  # class index (int) or regression target (float); None when unlabelled
    sfreq: float = 200.0
    # BIDS entities of the recording (data_prep.bids); "" elsewhere
    session: str = ""
    task: str = ""
    run: str = ""

    @property
    def input_chans(self) -> np.ndarray:
        """The model's input_chans: [N+1] with the leading 0 for cls."""
        return np.concatenate([[0], self.channel_rows]).astype(np.int32)


def encode(window: Window) -> bytes:
    signal = np.ascontiguousarray(window.signal)
    rows = np.ascontiguousarray(window.channel_rows, dtype="<i2")
    if signal.dtype not in (np.float32, np.float16) or signal.ndim != 3:
        raise UserError(f"{window.recording}: signal must be float32/float16 [N, A, 200], got "
                        f"{signal.dtype} {signal.shape}")
    if rows.shape != signal.shape[:1] or len(window.channel_names) != signal.shape[0]:
        raise UserError(f"{window.recording}: {signal.shape[0]} channels but {rows.shape[0]} rows and "
                        f"{len(window.channel_names)} names")
    header = {"shape": list(signal.shape), "dtype": signal.dtype.str.replace(">", "<").replace("=", "<"),
              "channel_names": list(window.channel_names), "recording": window.recording,
              "start": float(window.start), "dataset": window.dataset, "subject": window.subject,
              "label": window.label, "sfreq": float(window.sfreq)}
    # Only when set: records without them stay byte-identical to those written before the fields existed.
    header.update({name: getattr(window, name) for name in _BIDS_ENTITIES if getattr(window, name)})
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([MAGIC, _LEN.pack(len(head)), head, signal.astype(signal.dtype.newbyteorder("<")).tobytes(),
                     rows.tobytes()])


def decode(record: bytes) -> Window:
    """The window in a record; a record that is not one (a damaged shard, another tool's) is refused in one line."""
    if record[:len(MAGIC)] != MAGIC:
        raise UserError(f"not a labram-jax window record (starts {record[:8]!r})")
    try:
        return _decoded(record)
    except (ValueError, TypeError, KeyError, IndexError, struct.error, RecursionError) as error:
        raise UserError(f"a damaged window record: {type(error).__name__}: {one_line(error)}") from None


def _decoded(record: bytes) -> Window:
    (size,) = _LEN.unpack_from(record, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    header: dict[str, Any] = json.loads(record[start:start + size])
    shape, dtype = tuple(header["shape"]), np.dtype(header["dtype"])
    offset = start + size
    count = int(np.prod(shape))
    signal = np.frombuffer(record, dtype, count, offset).reshape(shape)
    rows = np.frombuffer(record, "<i2", shape[0], offset + count * dtype.itemsize)
    return Window(signal=signal, channel_rows=rows, channel_names=tuple(header["channel_names"]),
                  recording=header["recording"], start=header["start"], dataset=header["dataset"],
                  subject=header["subject"], label=header["label"], sfreq=header["sfreq"],
                  **{name: header.get(name, "") for name in _BIDS_ENTITIES})
